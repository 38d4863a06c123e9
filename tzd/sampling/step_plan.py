"""The step plan: which requests one step runs, in which order and forward, and their values on the device.

Rows that need the whole canvas (no cache, a block's first step under the approximate cache, classifier-
free guidance) come first, rows served from the KV cache after them, so that each forward takes a
contiguous run of the step's rows. The per-row values go to the device in one copy (rows.py); the
host keeps the table for the bookkeeping after the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tzd.sampling import rules
from tzd.sampling.rows import COLUMN, RowValues
from tzd.sampling.slot import LENGTH, SCHEDULED, Slot, SlotTable


@dataclass
class StepPlan:
    rows: list[int]  # the slot rows this step runs: full-forward rows first, then cached ones
    slots: list[Slot]  # their states, in the same order
    full: int  # how many of them (the first ones) run a whole-canvas forward
    values: RowValues  # their values on the device (with the host table)

    @property
    def full_values(self) -> RowValues:
        return self.values.rows(0, self.full)

    @property
    def cached_values(self) -> RowValues:
        return self.values.rows(self.full, len(self.rows))


def plan_step(table: SlotTable, active: list[int], shift: int, context: int, device: torch.device) -> StepPlan:
    """The plan for one step over the slot rows `active` (non-empty)."""
    wants = [table.slots[i].needs_full_forward() for i in active]
    full = [i for i, w in zip(active, wants, strict=True) if w]
    rows = full + [i for i, w in zip(active, wants, strict=True) if not w] if len(full) < len(active) else full
    slots = [table.slots[r] for r in rows]
    for r, s in zip(rows, slots, strict=True):
        if s.fresh:  # joined since the last step
            table.start(r)
    host = np.array([s.row(r, shift) for r, s in zip(rows, slots, strict=True)], dtype=np.int64)
    width = int(host[:, LENGTH].max())
    is_open = table.open[host[:, COLUMN["slot"]], :width]
    counts = is_open.sum(axis=1)
    P = int(counts.max())
    # each row's open offsets, ascending (a stable sort puts the open ones first in order), -1 after
    order = np.argsort(~is_open, axis=1, kind="stable")[:, :P]
    offsets = np.where(np.arange(P) < counts[:, None], order, -1)
    commits = rules.schedule_count(counts, host[:, COLUMN["steps_left"]])
    fixed = host[:, SCHEDULED]
    host[:, COLUMN["commits"]] = np.where(fixed > 0, np.minimum(fixed, counts), commits) if fixed.any() else commits
    positions = np.where(offsets >= 0, host[:, COLUMN["start"], None] + offsets, context)
    return StepPlan(rows, slots, len(full), RowValues.build(host, offsets, positions, device))
