"""The work around the training steps (validation, samples, logging) that must never cost a checkpoint.

A side task that raises is logged (with its traceback the first time), remembered, and skipped; training
goes on, the end-of-run checkpoint is written as usual, and only then does the run fail, naming what failed.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch.distributed as dist
from tqdm import tqdm

P = ParamSpec("P")
T = TypeVar("T")


class SideTaskError(RuntimeError):
    """Side tasks failed during a run whose checkpoint was saved; the message names each failure."""

    def __init__(self, failures: list[str], checkpoint: Path) -> None:
        super().__init__(f"side tasks failed (the checkpoint {checkpoint} was saved): " + "; ".join(failures))
        self.failures = failures
        self.checkpoint = checkpoint


class SideTasks:
    """Runs side tasks for one process and keeps the record of their failures."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size
        self._failed: dict[str, tuple[list[int], str]] = {}  # task -> (steps it failed at, first error)

    def run(self, name: str, step: int, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
        """fn(*args, **kwargs), or None when it raised (the failure is logged and recorded under `name`)."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # whatever a side task raises is recorded; none may stop training
            text = str(e).strip()
            error = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
            where = f"[rank {self.rank}] " if self.world_size > 1 else ""
            first = name not in self._failed
            steps, first_error = self._failed.setdefault(name, ([], error))
            steps.append(step)
            detail = f"\n{traceback.format_exc().rstrip()}" if first else ""
            tqdm.write(f"{where}side task {name!r} failed at step {step} ({error}); training goes on{detail}",
                       file=sys.stderr)
            return None

    @property
    def failed(self) -> bool:
        return bool(self._failed)

    def summary(self) -> list[str]:
        """One line per failed task: 'samples at step 6: RuntimeError: ...'."""
        lines = []
        for name, (steps, error) in self._failed.items():
            at = f"step {steps[0]}" if len(steps) == 1 else f"steps {', '.join(map(str, steps))}"
            lines.append(f"{name} at {at}: {error}")
        return lines

    def raise_if_failed(self, checkpoint: Path) -> None:
        """After the final save: SideTaskError naming every failure of every rank (all ranks call this)."""
        failures = self.summary()
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            per_rank: list[list[str] | None] = [None] * self.world_size
            dist.all_gather_object(per_rank, failures)
            ranks_of: dict[str, list[int]] = {}
            for rank, lines in enumerate(per_rank):
                for line in lines or []:
                    ranks_of.setdefault(line, []).append(rank)
            failures = [f"{line} (rank {', '.join(map(str, ranks))})" for line, ranks in ranks_of.items()]
        if failures:
            raise SideTaskError(failures, checkpoint)
