"""One request's denoising state in the batch (Slot), and what one step did to it (SlotStep).

A Slot holds everything the sampler keeps for a request between steps: its plan, where it is (block,
steps taken, positions still masked, forward passes), its KV-cache progress (the exact cache's final
prefix, its prompt blocks in the prefix pool) and the host rows of the step table it contributes. The
batch's host arrays (open offsets and the canvas copy, slots.SlotTable) are indexed by the slot's row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tzd.sampling.params import RequestPlan
from tzd.sampling.rows import FIELDS, float_bits

CACHE_MODES = {"none": 0, "prefix": 1, "dual": 2}
# host-only columns of Slot.row
LENGTH, MAX_TOKENS, EARLY_EXIT, TOP_LOGPROBS, SCHEDULED = (len(FIELDS) + i for i in range(5))


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
    # early exit (an EOS in the committed left part ended the row): the masked positions it set to EOS in
    # `canvas` without denoising them (`masked` is then 0), and the forwards the rest of the plan would
    # have taken (the remaining blocks' step budgets: exact for the fixed schedule, an upper bound with
    # threshold or entropy_bound)
    filled: int = 0
    nfe_saved: int = 0
    probs: np.ndarray | None = None  # [k] float32: each committed token's probability (its confidence)
    # for a request that asked (SamplingParams.top_logprobs): the top alternatives at each committed position
    top_ids: np.ndarray | None = None  # [k, top_logprobs] int64, most likely first
    top_logprobs: np.ndarray | None = None  # [k, top_logprobs] float32

    @property
    def committed(self) -> np.ndarray:
        """[k, 2] rows of (position, token id)."""
        return np.stack([self.positions, self.tokens], axis=1)


@dataclass
class Slot:
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
    _tail: tuple[int, ...] = field(default=(), repr=False)  # its host-only columns
    _block_row: tuple | None = field(default=None, repr=False)  # the block's part of `row`, keyed by its block
    cache_mode: int = field(init=False)  # CACHE_MODES of the plan's cache

    def __post_init__(self) -> None:
        self.cache_mode = CACHE_MODES[self.plan.params.cache]

    def block_bounds(self) -> tuple[int, int]:
        """(start, length) of the current block in canvas coordinates."""
        p = self.plan
        start = p.block_start(self.block)
        length = p.first_block if self.block == 0 and p.first_block else p.block_length
        return p.prompt_len + start, min(length, p.max_tokens - start)

    def row(self, slot: int, shift: int) -> tuple[int, ...]:
        """This request's values for one step in rows.FIELDS order (floats as their float64 bits), then
        five host-only columns: the current block's length, max_tokens, early_exit, top_logprobs and the
        commits LLaDA2's schedule fixes for this step (0: TZD's schedule, rules.schedule_count)."""
        key = (self.block, self.kv_valid)
        if self._block_row is None or self._block_row[0] != key:  # changes only with the block or the cache
            start, length = self.block_bounds()
            first, cols, keys = self.window(shift)
            self._block_row = (key, (slot, start, first, keys, cols), self.block_budget(), length)
        if self._fixed is None:  # the plan never changes: its part of the row is computed once
            p, sp = self.plan, self.plan.params
            self._fixed = (0, p.total_len, p.prompt_len, p.seed, sp.top_k, int(sp.remasking == "random"),
                           float_bits(sp.temperature), float_bits(sp.top_p), float_bits(p.threshold or 0.0),
                           float_bits(sp.cfg_scale), float_bits(sp.entropy_bound or 0.0))
            self._tail = (p.max_tokens, int(p.early_exit), sp.top_logprobs)
        _, head, budget, length = self._block_row
        if head[0] != slot:
            head = (slot, *head[1:])
        # the 0 leading _fixed is `commits`, set by plan_step
        sched = self.plan.block_schedule
        fixed = sched[min(self.block_step, len(sched) - 1)] if sched else 0
        return (*head, self.steps_done, max(budget - self.block_step, 1), *self._fixed, length, *self._tail, fixed)

    def block_budget(self, block: int | None = None) -> int:
        """Steps for the current block (or `block`): steps // blocks, the first steps % blocks one more, <= its
        masked positions (blocks of an infill's fixed text alone: none, and they do not count)."""
        return self.plan.block_budgets[self.block if block is None else block]

    def planned_forwards_left(self) -> int:
        """Forwards the plan still has for this request: the current block's budget left and every later
        block's (two per step with classifier-free guidance). Called once, when an early exit ends it."""
        steps = sum(self.block_budget(b) for b in range(self.block, self.plan.num_blocks)) - self.block_step
        return max(steps, 0) * (2 if self.plan.params.cfg_scale > 0 else 1)


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

    def block_done(self) -> bool:
        """Every position of the current block is committed (and so is every earlier block)."""
        return self.masked <= self.plan.masked_after(self.block)

    def needs_full_forward(self) -> bool:
        if self.cache_mode == 0 or self.plan.params.cfg_scale > 0:
            return True
        return self.block_step == 0 and not self.exact  # the approximate cache records at a block's start


class SlotTable:
    """The batch's slots and their host state, updated vectorised after each step: which offsets of a
    slot's current block are still masked (`open`), and a copy of its generated region (`gen`: the
    events' canvases, the EOS check)."""

    def __init__(self, capacity: int, context: int, mask_id: int) -> None:
        self.mask_id = mask_id
        self.slots: list[Slot | None] = [None] * capacity
        self.open = np.zeros((capacity, context), dtype=bool)
        self.gen = np.full((capacity, context), mask_id, dtype=np.int64)

    def __len__(self) -> int:
        return sum(s is not None for s in self.slots)

    def free_row(self) -> int:
        """The first free row; ValueError when every slot is taken."""
        return self.slots.index(None)

    def start(self, row: int) -> None:
        """A slot's first step: a masked canvas (an infill's fixed text in place), its first block open."""
        s = self.slots[row]
        s.fresh = False
        self.gen[row] = self.mask_id
        if s.plan.layout is not None:
            self.gen[row, :s.plan.max_tokens] = s.plan.layout.canvas(self.mask_id)
        self.open_block(row)

    def open_block(self, row: int) -> None:
        """The slot's current block becomes open: its positions still masked (an infill's fixed text is not)."""
        s = self.slots[row]
        start, length = s.block_bounds()
        off = start - s.plan.prompt_len
        self.open[row] = False
        self.open[row, :length] = self.gen[row, off:off + length] == self.mask_id
