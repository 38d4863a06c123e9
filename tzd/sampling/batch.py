"""A batch of requests being denoised: the facade over the engine core's pipeline.

Requests join (`add`) and leave (finished ones are freed inside `step`) between steps, so the same
object serves offline `generate()` and the server's continuous batching. One step is the pipeline
step plan (step_plan.py: which rows, which forward, their values in one host-to-device copy) -> model
runner (model_runner.py: at most two forwards, logits only at the block positions still masked) ->
sampler (sampler.py: the commit rule on the device) -> output processor (output.py: one device-to-host
copy, the step's only sync, then each request's progress and event). A request's state between steps
is its Slot (slot.py); its keys/values are in the paged store (kv_pages.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from tzd.models import ModelConfig, model_config
from tzd.sampling.cuda_graphs import WindowGraphs
from tzd.sampling.kv_pages import PagedKVStore
from tzd.sampling.model_runner import ModelRunner
from tzd.sampling.output import process
from tzd.sampling.params import RequestPlan
from tzd.sampling.prefix_pool import PrefixPool, block_hashes
from tzd.sampling.rows import COLUMN, download, upload
from tzd.sampling.sampler import sample
from tzd.sampling.slot import Slot, SlotStep, SlotTable, eos_set
from tzd.sampling.step_plan import StepPlan, plan_step

__all__ = ["DenoiseBatch", "SlotStep", "compute_dtype", "dense_kv_bytes", "eos_set", "kv_shape"]


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model's keys come in: its linear layers' (stored in the autocast dtype where one is used)."""
    from tzd.quant.linear import QuantizedLinear  # a quantized layer computes in (and returns) its .dtype

    linear = next((m for m in model.modules() if isinstance(m, (nn.Linear, QuantizedLinear))), None)
    if linear is None:
        return next(model.parameters()).dtype
    return linear.weight.dtype if isinstance(linear, nn.Linear) else linear.dtype


def kv_shape(cfg: ModelConfig) -> tuple[int, int, int]:
    """(layers, kv heads, head dim): what one cached position holds."""
    return cfg.n_layer, cfg.n_kv_head, cfg.head_dim


def dense_kv_bytes(cfg: ModelConfig, capacity: int, page_size: int, dtype: torch.dtype) -> int:
    """PagedKVStore.dense_bytes for a model of `cfg`."""
    return PagedKVStore.dense_bytes(capacity, *kv_shape(cfg), cfg.context_len, page_size, dtype)


class DenoiseBatch:
    """Up to `capacity` requests denoised together on `model`, their keys/values in `kv_cache_bytes` of
    pages (None: every slot a whole context); `cuda_graphs`: replay the cached step from CUDA graphs."""

    def __init__(self, model: nn.Module, mask_id: int, capacity: int, eos_id: int | Sequence[int] | None = None,
                 device: torch.device | str | None = None, prefix_pool_bytes: int = 0,
                 kv_cache_bytes: int | None = None, kv_page_size: int = 16,
                 kv_dtype: torch.dtype | None = None, cuda_graphs: bool = False) -> None:
        self.model = model
        self.cfg = model_config(model)
        self.mask_id, self.capacity = mask_id, capacity
        self.eos_ids = eos_set(eos_id)
        self._eos_host = np.array(self.eos_ids, dtype=np.int64)
        self.context = self.cfg.context_len
        self.block = self.cfg.denoise_block  # a block-causal model's blocks; None = bidirectional
        self.align = self.cfg.block_align
        self.shift = int(self.cfg.logit_shift)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        # one scratch column past the context: the step writes its padding columns there
        self.canvas = torch.full((capacity, self.context + 1), mask_id, dtype=torch.long, device=self.device)
        self.table = SlotTable(capacity, self.context, mask_id)
        self.kv = PagedKVStore.sized(capacity, *kv_shape(self.cfg), self.context, kv_page_size, kv_cache_bytes,
                                     kv_dtype or compute_dtype(model), self.device)
        self.runner = ModelRunner(model, self.cfg, self.canvas, self.kv, mask_id)
        if cuda_graphs:  # the cached step inside a block, captured per shape bucket (CUDA only)
            self.runner.graphs = WindowGraphs(model, self.kv, mask_id, self.context, self.block is not None)
        # prompt blocks shared across requests: block-causal models only (a bidirectional prompt's keys
        # depend on everything after them)
        # blocks of whole pages are shared by reference (the pool holds the pages); others are copied
        shares = self.block is not None and self.block % kv_page_size == 0 and not self.shift
        self.pool = (PrefixPool(prefix_pool_bytes, self.block, self.kv if shares else None)
                     if self.block and prefix_pool_bytes > 0 else None)

    @property
    def slots(self) -> list[Slot | None]:
        return self.table.slots

    def __len__(self) -> int:
        return len(self.table)

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self)

    def pages_for(self, plan: RequestPlan) -> int:
        """KV pages a request holds while it runs: its whole canvas when it uses the cache, else none."""
        return self.kv.pages_for(plan.total_len) if plan.params.cache != "none" else 0

    def check_fits(self, plan: RequestPlan) -> None:
        """ValueError when `plan` needs more KV pages than the whole cache holds: it could never start."""
        need = self.pages_for(plan)
        if need > self.kv.num_pages:
            raise ValueError(f"prompt + max_tokens = {plan.total_len} needs {need} KV pages of "
                             f"{self.kv.page_size}; the whole cache has {self.kv.num_pages}")

    @torch.inference_mode()
    def add(self, prompt: list[int], plan: RequestPlan, handle: Any = None) -> int:
        """Place a request in a free slot; its row is the prompt followed by max_tokens masks (an infill's
        canvas and suffix: plan.layout)."""
        if plan.total_len > self.context:
            raise ValueError(f"prompt + max_tokens = {plan.total_len} exceeds the context of {self.context}")
        if plan.layout is not None and self.block is not None:
            raise ValueError("suffix: a block-causal model cannot see text after its canvas (no infilling)")
        if self.shift and not prompt:
            raise ValueError("a model with shifted logits needs a prompt of at least one token")
        if self.block is not None and (plan.block_length != min(self.block, plan.max_tokens) or
                                       bool(plan.first_block) != (self.align == "absolute" and
                                                                  len(prompt) % self.block > 0)):
            raise ValueError(f"block_length {plan.block_length}: this block-causal model denoises blocks of "
                             f"{self.block} aligned to its {self.align!r} layout (plan it with model_block)")
        self.check_fits(plan)
        need = self.pages_for(plan)
        slot = self.table.free_row()  # raises ValueError when full: the scheduler admits into free slots only
        self.kv.allocate(slot, plan.total_len if need else 0)  # MemoryError when too few pages are free
        row = np.full(self.context + 1, self.mask_id, dtype=np.int64)
        row[:len(prompt)] = prompt
        if plan.layout is not None:  # an infill: its canvas's fixed text, then the suffix
            row[len(prompt):plan.total_len] = np.concatenate([plan.layout.canvas(self.mask_id), plan.layout.suffix])
        self.canvas[slot] = upload(row, self.device)
        s = self.slots[slot] = Slot(handle, plan, masked=plan.masked,
                                    exact=self.block is not None and plan.params.cache != "none")
        if s.exact and self.pool is not None and plan.params.cfg_scale == 0:
            s.hashes = block_hashes(prompt, self.block)
            self._attach_prefix(slot, s)
        return slot

    @torch.inference_mode()
    def _attach_prefix(self, slot: int, s: Slot) -> None:
        """Give the slot the prompt's leading blocks found in the pool (their pages, or a copy of their keys/
        values); wait for a block another request is computing right now rather than computing it twice."""
        found = self.pool.lookup(s.hashes)
        N = self.block
        if found and self.pool.shares_pages:
            self.kv.share(slot, 0, [p for pages in found for p in pages])  # no copy: the same pages
        elif found:
            self.kv.ensure(found[0][0].dtype)
            k = torch.cat([e[0] for e in found], dim=2)  # [layers, Hk, blocks x N, D]
            v = torch.cat([e[1] for e in found], dim=2)
            self.kv.scatter(slot, 0, k, v)
        s.kv_valid = s.pooled = len(found)
        s.kv_valid *= N
        missing = s.hashes[len(found):]
        s.waits_for = missing[0] if missing and missing[0] in self.pool.pending else None
        if s.waits_for is None:  # counted once, when the request starts
            self.pool.pending.update(missing)  # this request computes them
            self.pool.count(len(s.hashes), len(found))

    def _pool_blocks(self, slot: int, s: Slot) -> None:
        """Put the prompt blocks whose keys/values became final in this step into the pool."""
        done = min(s.kv_valid // self.block, len(s.hashes))
        N = self.block
        per_block = N // self.kv.page_size
        for j in range(s.pooled, done):
            if self.pool.shares_pages:  # a reference to the block's own pages: it is final, never written again
                self.pool.put(s.hashes[j], self.kv.held(slot, j * per_block, per_block))
            else:
                self.pool.put(s.hashes[j], self.kv.gather(slot, slice(j * N, (j + 1) * N)))
        s.pooled = max(s.pooled, done)

    def _release(self, slot: int, s: Slot) -> None:
        """A request leaves: its KV pages go back to the pool; if it had not computed its prompt blocks
        yet, others must not wait for them."""
        self.kv.release(slot)
        self.slots[slot] = None
        if self.pool is not None and s.waits_for is None:
            self.pool.pending.difference_update(s.hashes[s.pooled:])

    def remove(self, handle: Any) -> Slot | None:
        """Drop a request (cancelled, ended, preempted); its slot as it left (its progress), None if it was
        not here."""
        for i, s in enumerate(self.slots):
            if s is not None and s.handle is handle:
                self._release(i, s)
                return s
        return None

    @torch.inference_mode()
    def step(self) -> list[SlotStep]:
        """One denoising step for every request in the batch; finished requests are freed."""
        for i, s in enumerate(self.slots):
            if s is not None and s.waits_for is not None and s.waits_for not in self.pool.pending:
                self._attach_prefix(i, s)  # the block it waited for is in the pool now (or was given up)
        active = [i for i, s in enumerate(self.slots) if s is not None and s.waits_for is None]
        if not active:
            return []
        plan = plan_step(self.table, active, self.shift, self.context, self.device)
        c = sample(self.runner.logits(plan), plan.values, self.canvas, self.mask_id)
        tokens, probs, top_ids, top_lps = download(c.tokens, c.probs, c.top_ids, c.top_logprobs)  # the one copy
        top = (c.top_rows, top_ids, top_lps) if top_ids is not None else None
        events = process(plan, tokens, self.table, self._eos_host, probs, top)
        self._after_step(plan, events)
        return events

    def _after_step(self, plan: StepPlan, events: list[SlotStep]) -> None:
        """The exact cache's final prefix and the prefix pool; then finished requests leave."""
        starts = plan.values.table[:, COLUMN["start"]]
        for row, s, start, ev in zip(plan.rows, plan.slots, starts.tolist(), events, strict=True):
            if s.exact:  # this step wrote final keys/values for everything before its block
                s.kv_valid = start if self.align == "prompt" else start - start % self.block
                if s.hashes:
                    self._pool_blocks(row, s)
            if ev.done:
                self._release(row, s)
