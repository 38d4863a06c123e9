"""A batch of requests being denoised: a slot table on the device plus one batched step.

Requests join (`add`) and leave (finished ones are freed inside `step`) between steps, so the same
object serves offline `generate()` and the server's continuous batching. Per step: one
host-to-device copy of the per-row values (rows.py), at most two forward passes (rows that need the
whole canvas, rows served from the block KV cache) with logits only at the block positions still
masked, the commit rule vectorised over rows, and one device-to-host copy for the events: the step's
only sync with the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from tzd.models import ForwardContext, ModelConfig, model_config
from tzd.models.blocks import block_ids, token_block_ids
from tzd.sampling import rules
from tzd.sampling.cache import PackedRecordView, ReadView, RecordView
from tzd.sampling.kv_pages import PagedKVStore
from tzd.sampling.params import RequestPlan
from tzd.sampling.prefix_pool import PrefixPool, block_hashes
from tzd.sampling.rows import COLUMN, FIELDS, RowValues, float_bits, upload

CACHE_MODES = {"none": 0, "prefix": 1, "dual": 2}
_LENGTH, _MAX_TOKENS = len(FIELDS), len(FIELDS) + 1  # host-only columns of _Slot.row


def eos_set(eos: int | Sequence[int] | None) -> tuple[int, ...]:
    """The ids that end a generation: one id, several (an instruct model's end-of-turn and end-of-text), or none."""
    if eos is None:
        return ()
    return (int(eos),) if isinstance(eos, int) else tuple(dict.fromkeys(int(e) for e in eos))


@dataclass(slots=True)
class SlotStep:
    """What one step did to one request. Positions count from the first generated token.

    The arrays are the step's own (views of arrays no later step writes): a consumer may keep them or
    read them on another thread while the batch runs its next step."""

    handle: Any
    step: int
    steps: int
    positions: np.ndarray  # [k] int64: the positions this step committed, ascending
    tokens: np.ndarray  # [k] int64: the token ids committed there
    masked: int
    canvas: np.ndarray  # [max_tokens] int64: the generated region, mask ids where still masked
    nfe: int
    done: bool
    finish_reason: str | None = None  # "length" | "stop" (EOS) once done

    @property
    def committed(self) -> np.ndarray:
        """[k, 2] rows of (position, token id)."""
        return np.stack([self.positions, self.tokens], axis=1)


@dataclass
class _Slot:
    handle: Any
    plan: RequestPlan
    block: int = 0  # index of the current block
    block_step: int = 0  # steps taken inside it
    masked: int = 0
    steps_done: int = 0
    nfe: int = 0
    fresh: bool = True  # not yet seen by a step: its host rows (open offsets, canvas copy) are set then
    exact: bool = False  # a block-causal model's exact cache (any cache mode but none)
    kv_valid: int = 0  # exact cache: the store holds final keys/values for canvas positions [0, kv_valid)
    hashes: list[bytes] = field(default_factory=list)  # prefix pool: the prompt's full blocks
    pooled: int = 0  # leading prompt blocks already in the pool (found there, or put there by this request)
    waits_for: bytes | None = None  # a block another request is computing now: this one starts after it
    _fixed: tuple[int, ...] | None = field(default=None, repr=False)  # the plan's part of `row`

    def block_bounds(self) -> tuple[int, int]:
        """(start, length) of the current block in canvas coordinates."""
        p = self.plan
        start = p.block_start(self.block)
        length = p.first_block if self.block == 0 and p.first_block else p.block_length
        return p.prompt_len + start, min(length, p.max_tokens - start)

    def row(self, slot: int, shift: int) -> tuple[int, ...]:
        """This request's values for one step in rows.FIELDS order (floats as their float64 bits), then
        two host-only columns: the current block's length and max_tokens."""
        start, length = self.block_bounds()
        first, cols, keys = self.window(shift)
        if self._fixed is None:  # the plan never changes: its part of the row is computed once
            p, sp = self.plan, self.plan.params
            self._fixed = (p.total_len, p.prompt_len, p.seed, sp.top_k, int(sp.remasking == "random"),
                           float_bits(sp.temperature), float_bits(sp.top_p), float_bits(sp.threshold or 0.0),
                           float_bits(sp.cfg_scale))
        return (slot, start, first, keys, cols, self.steps_done, max(self.block_budget() - self.block_step, 1),
                0, *self._fixed, length, self.plan.max_tokens)  # 0: `commits`, set by _row_values

    def block_budget(self) -> int:
        """Steps for the current block: steps // blocks, the first steps % blocks one more, <= its length."""
        p = self.plan
        base, extra = divmod(p.steps, p.num_blocks)
        return min(base + (1 if self.block < extra else 0), self.block_bounds()[1])

    @property
    def cache_mode(self) -> int:
        return CACHE_MODES[self.plan.params.cache]

    def window(self, shift: int = 0) -> tuple[int, int, int]:
        """(first column, columns, keys) of a cached forward. Approximate cache: prefix runs the block and
        everything after it, dual the block, against the whole canvas. Exact cache: from the first position
        whose keys are not final yet (the prompt at first, the block just finished at a block's first step)
        to the current block's end, against the keys up to there. `shift` columns more on the left for
        models whose logits at i come from the output at i-1."""
        start, length = self.block_bounds()
        if self.exact:
            first = max(0, min(self.kv_valid, start - shift))
            return first, start + length - first, start + length
        return start - shift, (self.plan.total_len - start if self.cache_mode == 1 else length) + shift, \
            self.plan.total_len

    def needs_full_forward(self) -> bool:
        if self.cache_mode == 0 or self.plan.params.cfg_scale > 0:
            return True
        return self.block_step == 0 and not self.exact  # the approximate cache records at a block's start


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model's keys come in: its linear layers' (stored in the autocast dtype where one is used)."""
    linear = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    return linear.weight.dtype if linear is not None else next(model.parameters()).dtype


def kv_shape(cfg: ModelConfig) -> tuple[int, int, int]:
    """(layers, kv heads, head dim): what one cached position holds."""
    return cfg.n_layer, cfg.n_kv_head, cfg.head_dim


def kv_store(cfg: ModelConfig, capacity: int, device: torch.device, budget_bytes: int | None, page_size: int,
             dtype: torch.dtype) -> PagedKVStore:
    """The paged KV store for a batch: `budget_bytes` of pages (None: enough for every slot to hold a
    whole context, the dense store's worth, so that pages never limit admission)."""
    page = PagedKVStore.page_bytes(*kv_shape(cfg), page_size, dtype)
    per_context = -(-cfg.block_size // page_size)
    pages = capacity * per_context if budget_bytes is None else int(budget_bytes // page)
    return PagedKVStore(capacity, *kv_shape(cfg), cfg.block_size, page_size, pages, device)


class DenoiseBatch:
    """Up to `capacity` requests denoised together on `model`."""

    def __init__(self, model: nn.Module, mask_id: int, capacity: int, eos_id: int | Sequence[int] | None = None,
                 device: torch.device | str | None = None, prefix_pool_bytes: int = 0,
                 kv_cache_bytes: int | None = None, kv_page_size: int = 16,
                 kv_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.cfg = model_config(model)
        self.mask_id, self.capacity = mask_id, capacity
        self.eos_ids = eos_set(eos_id)
        self.context = self.cfg.block_size
        self.block = self.cfg.denoise_block  # a block-causal model's blocks; None = bidirectional
        self.align = self.cfg.block_align
        self.shift = int(self.cfg.logit_shift)  # a cached window starts one column left of its block
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        # one scratch column past the context: the step writes its padding columns there
        self.canvas = torch.full((capacity, self.context + 1), mask_id, dtype=torch.long, device=self.device)
        self.slots: list[_Slot | None] = [None] * capacity
        # host state per slot, updated vectorised after each step: which offsets of the current block are
        # still masked, and a copy of the generated region (the events' canvases, the EOS check)
        self._open = np.zeros((capacity, self.context), dtype=bool)
        self._gen = np.full((capacity, self.context), mask_id, dtype=np.int64)
        self._eos_host = np.array(self.eos_ids, dtype=np.int64)
        self.kv = kv_store(self.cfg, capacity, self.device, kv_cache_bytes, kv_page_size,
                           kv_dtype or compute_dtype(model))
        # prompt blocks shared across requests: block-causal models only (a bidirectional prompt's keys
        # depend on everything after them)
        self.pool = PrefixPool(prefix_pool_bytes, self.block) if self.block and prefix_pool_bytes > 0 else None

    def __len__(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self)

    def pages_for(self, plan: RequestPlan) -> int:
        """KV pages a request holds while it runs: its whole canvas when it uses the cache, else none."""
        return self.kv.pages_for(plan.total_len) if plan.params.cache != "none" else 0

    def fits(self, plan: RequestPlan) -> bool:
        """A free slot and enough free KV pages for `plan` now."""
        return self.free_slots > 0 and self.pages_for(plan) <= self.kv.free_pages

    @torch.inference_mode()
    def add(self, prompt: list[int], plan: RequestPlan, handle: Any = None) -> int:
        """Place a request in a free slot; its canvas is the prompt followed by max_tokens masks."""
        if plan.total_len > self.context:
            raise ValueError(f"prompt + max_tokens = {plan.total_len} exceeds the context of {self.context}")
        if self.shift and not prompt:
            raise ValueError("a model with shifted logits needs a prompt of at least one token")
        if self.block is not None and (plan.block_length != min(self.block, plan.max_tokens) or
                                       bool(plan.first_block) != (self.align == "absolute" and
                                                                  len(prompt) % self.block > 0)):
            raise ValueError(f"block_length {plan.block_length}: this block-causal model denoises blocks of "
                             f"{self.block} aligned to its {self.align!r} layout (plan it with model_block)")
        need = self.pages_for(plan)
        if need > self.kv.num_pages:
            raise ValueError(f"prompt + max_tokens = {plan.total_len} needs {need} KV pages of "
                             f"{self.kv.page_size}; the whole cache has {self.kv.num_pages}")
        slot = self.slots.index(None)  # raises ValueError when full: callers check fits()
        self.kv.allocate(slot, plan.total_len if need else 0)  # MemoryError when too few pages are free
        row = np.full(self.context + 1, self.mask_id, dtype=np.int64)
        row[:len(prompt)] = prompt
        self.canvas[slot] = upload(row, self.device)
        s = self.slots[slot] = _Slot(handle, plan, masked=plan.max_tokens,
                                     exact=self.block is not None and plan.params.cache != "none")
        if s.exact and self.pool is not None and plan.params.cfg_scale == 0:
            s.hashes = block_hashes(prompt, self.block)
            self._attach_prefix(slot, s)
        return slot

    @torch.inference_mode()
    def _attach_prefix(self, slot: int, s: _Slot) -> None:
        """Copy the prompt's leading blocks found in the pool into the slot's keys/values; wait for a block
        another request is computing right now rather than computing it twice."""
        found = self.pool.lookup(s.hashes)
        N = self.block
        if found:
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

    def _pool_blocks(self, slot: int, s: _Slot) -> None:
        """Put the prompt blocks whose keys/values became final in this step into the pool."""
        done = min(s.kv_valid // self.block, len(s.hashes))
        N = self.block
        for j in range(s.pooled, done):
            self.pool.put(s.hashes[j], *self.kv.gather(slot, slice(j * N, (j + 1) * N)))
        s.pooled = max(s.pooled, done)

    def _release(self, slot: int, s: _Slot) -> None:
        """A request leaves: its KV pages go back to the pool; if it had not computed its prompt blocks
        yet, others must not wait for them."""
        self.kv.release(slot)
        self.slots[slot] = None
        if self.pool is not None and s.waits_for is None:
            self.pool.pending.difference_update(s.hashes[s.pooled:])

    def remove(self, handle: Any) -> bool:
        """Drop a request (cancelled); True if it was here."""
        for i, s in enumerate(self.slots):
            if s is not None and s.handle is handle:
                self._release(i, s)
                return True
        return False

    # ---- one step -------------------------------------------------------------------------------

    def _row_values(self, rows: list[int], slots: list[_Slot]) -> RowValues:
        """The step's values on the device, with their host table (FIELDS, then the block's length and
        max_tokens per row) and open offsets for the bookkeeping after it."""
        for r, s in zip(rows, slots, strict=True):
            if s.fresh:  # joined since the last step: a masked canvas, its first block all open
                s.fresh = False
                self._gen[r] = self.mask_id
                self._open[r] = False
                self._open[r, :s.block_bounds()[1]] = True
        table = np.array([s.row(r, self.shift) for r, s in zip(rows, slots, strict=True)], dtype=np.int64)
        width = int(table[:, _LENGTH].max())
        is_open = self._open[table[:, COLUMN["slot"]], :width]
        counts = is_open.sum(axis=1)
        P = int(counts.max())
        # each row's open offsets, ascending (a stable sort puts the open ones first in order), -1 after
        order = np.argsort(~is_open, axis=1, kind="stable")[:, :P]
        offsets = np.where(np.arange(P) < counts[:, None], order, -1)
        table[:, COLUMN["commits"]] = rules.schedule_count(counts, table[:, COLUMN["steps_left"]])
        positions = np.where(offsets >= 0, table[:, COLUMN["start"], None] + offsets, self.context)
        return RowValues.build(table, offsets, positions, self.device)

    def _full_logits(self, rv: RowValues, slots: list[_Slot]) -> torch.Tensor:
        """Whole-canvas forward for these rows; logits at the open positions of each row's block [n, P, V]."""
        if len({s.plan.total_len for s in slots}) > 1:
            return self._packed_logits(rv, slots)
        return self._padded_logits(rv, slots)

    def _padded_logits(self, rv: RowValues, slots: list[_Slot]) -> torch.Tensor:
        """_full_logits with the rows padded to the longest (keys past a row's length masked)."""
        L = max(s.plan.total_len for s in slots)
        ids = self.canvas[rv.slot, :L]
        seqlens = rv.total_len
        pos = rv.start[:, None] + rv.offsets.clamp(min=0)  # padding columns read the block's first position
        cfg_rows = [i for i, s in enumerate(slots) if s.plan.params.cfg_scale > 0]
        if cfg_rows:  # unconditional copies with the prompt masked, in the same forward
            ci = upload(np.array(cfg_rows, dtype=np.int64), self.device)
            in_prompt = torch.arange(L, device=self.device)[None, :] < rv.prompt_len[ci][:, None]
            ids = torch.cat([ids, ids[ci].masked_fill(in_prompt, self.mask_id)])
            seqlens = torch.cat([seqlens, seqlens[ci]])
            pos = torch.cat([pos, pos[ci]])
        blocks = None
        if self.block is not None:  # block-causal: every row's own layout (its prompt is its leading span)
            prompt_len = rv.prompt_len if not cfg_rows else torch.cat([rv.prompt_len, rv.prompt_len[ci]])
            blocks = block_ids(L, prompt_len, self.block, align=self.align)
        if all(s.plan.total_len == L for s in slots):
            seqlens = None  # no padding: attention takes its unmasked fast path
        record = any(s.cache_mode and not s.exact for s in slots)
        cache = RecordView(self.kv, rv.slot, seqlens, L) if record else None
        logits = self.model(ids, ForwardContext(seqlens=seqlens, cache=cache, output_positions=pos,
                                                block_ids=blocks))
        if cfg_rows:
            n, scale = len(slots), rv.cfg_scale[ci]
            cond, uncond = logits[ci], logits[n:]
            logits = logits[:n].index_copy(0, ci, uncond + (scale[:, None, None] + 1) * (cond - uncond))
        return logits

    def _packed_logits(self, rv: RowValues, slots: list[_Slot]) -> torch.Tensor:
        """_full_logits for rows of different lengths: their tokens one after another in a single row
        (varlen attention), so the step costs the tokens the rows hold, not rows x the longest."""
        n = len(slots)
        order = np.array([*range(n), *(i for i, s in enumerate(slots) if s.plan.params.cfg_scale > 0)])
        lens = np.array([slots[i].plan.total_len for i in order], dtype=np.int64)
        cu = np.concatenate([[0], np.cumsum(lens)])
        row = np.repeat(np.arange(len(order)), lens)  # packed row of each token
        host = np.concatenate([order[row], np.arange(cu[-1]) - cu[:-1][row], order, cu])
        table = upload(host, self.device)  # the packing's one host-to-device copy
        N, R = int(cu[-1]), len(order)
        src, pos = table[:N], table[N:2 * N]  # each token's batch row and position in its row
        rows, cu_t = table[2 * N:2 * N + R], table[2 * N + R:]
        ids = self.canvas[rv.slot[src], pos]
        if R > n:  # unconditional copies (classifier-free guidance) with the prompt masked
            uncond = (torch.arange(N, device=self.device) >= int(cu[n])) & (pos < rv.prompt_len[src])
            ids = ids.masked_fill(uncond, self.mask_id)
        blocks = None
        if self.block is not None:
            blocks = token_block_ids(pos, rv.prompt_len[src], self.block, self.align)[None]
        record = any(s.cache_mode and not s.exact for s in slots)
        cache = PackedRecordView(self.kv, rv.slot[src[:int(cu[n])]], pos[:int(cu[n])]) if record else None
        out = cu_t[:R, None] + rv.start[rows][:, None] + rv.offsets[rows].clamp(min=0)  # [R, P] flat indices
        ctx = ForwardContext(positions=pos[None], cache=cache, output_positions=out.reshape(1, -1),
                             block_ids=blocks, query_blocks=blocks, cu_seqlens=cu_t.int(), max_seqlen=int(lens.max()))
        logits = self.model(ids[None], ctx).view(R, out.shape[1], -1)
        if R > n:
            ci = rows[n:]
            scale = rv.cfg_scale[ci]
            cond, uncond_logits = logits[ci], logits[n:]
            logits = logits[:n].index_copy(0, ci, uncond_logits + (scale[:, None, None] + 1) * (cond - uncond_logits))
        return logits

    def _cached_logits(self, rv: RowValues, slots: list[_Slot]) -> torch.Tensor:
        """Forward of each row's query window only (_Slot.window), keys from the cache."""
        windows = [s.window(self.shift) for s in slots]
        Q = max(w[1] for w in windows)
        offs = torch.arange(Q, device=self.device)
        positions = (rv.window_start[:, None] + offs).clamp(max=self.context - 1)
        ids = self.canvas[rv.slot[:, None], positions]
        # columns past a row's own window (a dual row beside prefix rows, a short last block) are padding
        kv_positions = torch.where(offs[None, :] < rv.query_len[:, None], positions, self.kv.scratch)
        lengths = [w[2] for w in windows]
        keys = max(lengths)
        view = ReadView(self.kv, rv.slot, kv_positions, keys, None if min(lengths) == keys else rv.key_len,
                        rv.table[:, COLUMN["slot"]])
        opened = rv.offsets.clamp(min=0) + (rv.start - rv.window_start)[:, None]  # the block's columns
        blocks = (block_ids(self.context, rv.prompt_len, self.block, align=self.align)
                  if self.block is not None else None)
        return self.model(ids, ForwardContext(positions=positions, seqlens=rv.key_len, cache=view,
                                              output_positions=opened, block_ids=blocks))

    @torch.inference_mode()
    def step(self) -> list[SlotStep]:
        """One denoising step for every request in the batch; finished requests are freed."""
        for i, s in enumerate(self.slots):
            if s is not None and s.waits_for is not None and s.waits_for not in self.pool.pending:
                self._attach_prefix(i, s)  # the block it waited for is in the pool now (or was given up)
        active = [i for i, s in enumerate(self.slots) if s is not None and s.waits_for is None]
        if not active:
            return []
        full = [i for i in active if self.slots[i].needs_full_forward()]
        cached = [i for i in active if not self.slots[i].needs_full_forward()]
        rows = full + cached
        slots = [self.slots[r] for r in rows]
        n, nf = len(rows), len(full)
        rv = self._row_values(rows, slots)  # the step's one host-to-device copy
        # logits only where a block still has masks: committed positions need none
        parts = []
        if full:
            parts.append(self._full_logits(rv.rows(0, nf), slots[:nf]))
        if cached:
            parts.append(self._cached_logits(rv.rows(nf, n), slots[nf:]))
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        logits = logits.float()  # fp32 once: argmax and softmax on bf16 are several times slower on CPU
        logits[..., self.mask_id] = float("-inf")  # the mask is never a prediction
        return self._commit(logits, rv, slots)

    def _commit(self, logits: torch.Tensor, rv: RowValues, slots: list[_Slot]) -> list[SlotStep]:
        """The commit rule on the device, its result copied to the host once, then the host bookkeeping."""
        table = rv.table
        # the open offsets are exactly the block's masked positions; padding columns read and write the
        # canvas's scratch column (no boolean indexing, a device sync, and no duplicates in the canvas)
        in_block, pos = rv.offsets >= 0, rv.positions
        c = COLUMN  # flags from the host table: positive float64 bits order as the floats do
        sampling = bool(table[:, c["temperature"]].any())
        filtering = bool(table[:, c["top_k"]].any() or (table[:, c["top_p"]] < float_bits(1.0)).any())
        any_random = bool(table[:, c["random_remask"]].any())
        any_threshold = bool(table[:, c["threshold"]].any())
        tokens = rules.choose_tokens(logits, rv.temperature, rv.top_k, rv.top_p, rv.seed, rv.steps_done, pos,
                                     sampling, filtering)
        conf = rules.confidence(logits, tokens, rv.random_remask, rv.seed, rv.steps_done, pos, any_random)
        select, _ = rules.select_commits(conf, in_block, rv.steps_left, rv.threshold, any_threshold, rv.commits)
        committed = torch.where(select, tokens, -1)
        self.canvas.index_put_((rv.slot[:, None].expand_as(pos), pos), torch.where(select, tokens, self.mask_id))
        return self._advance(table, rv.host_offsets, committed.cpu().numpy(), slots)  # the one device-to-host copy

    def _advance(self, table: np.ndarray, offsets: np.ndarray, committed: np.ndarray,
                 slots: list[_Slot]) -> list[SlotStep]:
        """Host bookkeeping after a step, vectorised over rows: the open offsets and the canvas copy, the
        EOS check; then per request its counters, the event, freeing a finished slot."""
        c = COLUMN
        slot_of = table[:, c["slot"]]
        ri, ci = np.nonzero(committed >= 0)  # row-major: each row's commits in ascending offsets
        off = offsets[ri, ci]
        positions = (table[:, c["start"]] - table[:, c["prompt_len"]])[ri] + off  # from the first generated token
        tokens = committed[ri, ci]
        self._open[slot_of[ri], off] = False
        self._gen[slot_of[ri], positions] = tokens
        counts = np.bincount(ri, minlength=len(slots))
        ends = np.cumsum(counts)
        G = int(table[:, _MAX_TOKENS].max())
        canvas = self._gen[slot_of, :G]  # a copy: the events' canvases (mask ids past a row's max_tokens)
        eos = np.zeros(len(slots), dtype=bool)
        if self.eos_ids:  # an EOS inside the fully committed left part ends the request
            is_mask = canvas == self.mask_id
            first_mask = np.where(is_mask.any(axis=1), is_mask.argmax(axis=1), G)
            eos = (np.isin(canvas, self._eos_host) & (np.arange(G) < first_mask[:, None])).any(axis=1)
        events = []
        for i, s in enumerate(slots):
            row = int(slot_of[i])
            if s.exact:  # this step wrote final keys/values for everything before its block
                start = int(table[i, c["start"]])
                s.kv_valid = start if self.align == "prompt" else start - start % self.block
                if s.hashes:
                    self._pool_blocks(row, s)
            s.masked -= int(counts[i])
            s.steps_done += 1
            s.nfe += 2 if table[i, c["cfg_scale"]] else 1
            s.block_step += 1
            if s.masked and self._block_done(s):
                s.block, s.block_step = s.block + 1, 0
                self._open[row, :s.block_bounds()[1]] = True
            done = bool(eos[i]) or s.masked == 0
            if done:
                self._release(row, s)
            a = int(ends[i]) - int(counts[i])
            events.append(SlotStep(s.handle, s.steps_done - 1, s.plan.steps, positions[a:ends[i]], tokens[a:ends[i]],
                                   s.masked, canvas[i, :s.plan.max_tokens], s.nfe, done,
                                   ("stop" if eos[i] else "length") if done else None))
        return events

    @staticmethod
    def _block_done(s: _Slot) -> bool:
        start, length = s.block_bounds()
        committed_before = start - s.plan.prompt_len  # every earlier block is fully committed
        return s.plan.max_tokens - s.masked >= committed_before + length
