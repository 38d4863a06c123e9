"""The engine core: one scheduler and one DenoiseBatch, driven one step at a time by whoever serves.

A step is schedule -> run -> commit -> update: the ones the output side ended (aborts), requests past
their deadline and cancelled ones leave; the first in line join while every budget has room, preempting
lower priorities for slots or pages (the scheduler's rule); one
batched denoising step runs (the batch commits on the device, the output processor updates each slot);
the requests the step finished leave the scheduler. What the step did comes back as one CoreStep.

A preempted request leaves the batch and waits; when it runs again it is recomputed from its first step
(same plan, same seed, batch-invariant steps: the same commits), and the steps its consumer already had
(`CoreRequest.replay`) are not reported again, so a stream goes on where it was.

Offline generate() and the server's engine both drive it: the same admission rule, the same path. The
server calls `submit`, `cancel` and `abort` on its event loop and `step` on its step thread, so the
scheduler's line is guarded by a lock; the batch is only ever touched by `step`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from tzd.sampling.batch import DenoiseBatch, SlotStep
from tzd.sampling.config import EngineConfig
from tzd.sampling.scheduler import CoreRequest, Scheduler, Status

__all__ = ["CoreStep", "EngineCore"]


@dataclass
class CoreStep:
    """One step's outcome, for the output side."""

    admitted: list[CoreRequest] = field(default_factory=list)  # joined the batch in this step
    not_started: list[tuple[CoreRequest, Exception]] = field(default_factory=list)  # the batch refused them
    expired: list[CoreRequest] = field(default_factory=list)  # past their deadline (waiting or running): gone
    preempted: list[CoreRequest] = field(default_factory=list)  # left the batch to wait again (recomputed later)
    replayed: int = 0  # steps run again for preempted requests and not reported (their recomputation)
    events: list[SlotStep] = field(default_factory=list)  # one per running request, in the batch's row order
    batch_size: int = 0  # requests in the batch when it stepped
    duration: float = 0.0  # seconds of the batch's step
    error: Exception | None = None  # the batch's step raised: every running request left
    failed: list[CoreRequest] = field(default_factory=list)  # those requests


class EngineCore:
    """Admission (`scheduler`) into `batch`, and its steps."""

    @classmethod
    def create(cls, model: nn.Module, mask_id: int, config: EngineConfig, eos_id: int | Sequence[int] | None = None,
               kv_dtype: torch.dtype | None = None) -> EngineCore:
        """The core of `config`: its DenoiseBatch on `model` (slots, KV pages, prefix pool, graphs) and its
        scheduler (slots, line, token budget)."""
        batch = DenoiseBatch(model, mask_id, config.max_batch_size, eos_id=eos_id,
                             prefix_pool_bytes=config.prefix_pool_bytes, kv_cache_bytes=config.kv_cache_bytes,
                             kv_page_size=config.kv_page_size, kv_dtype=kv_dtype, cuda_graphs=config.cuda_graphs)
        return cls(batch, config.max_batch_size, config.max_waiting, config.max_batched_tokens)

    def __init__(self, batch: DenoiseBatch, max_running: int | None = None, max_waiting: int = 1 << 30,
                 max_tokens: int | None = None) -> None:
        self.batch = batch
        self.scheduler = Scheduler(min(max_running or batch.capacity, batch.capacity), max_waiting, max_tokens,
                                   batch.kv.num_pages, lambda r: batch.pages_for(r.plan))
        self._lock = threading.Lock()
        self._aborts: list[CoreRequest] = []  # ended by the output side: they leave the batch at the next step
        self._replaying: set[CoreRequest] = set()  # recomputing steps already reported (after a preemption)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborts)

    def submit(self, requests: Sequence[CoreRequest]) -> None:
        """Queue all of `requests` or none; raises scheduler.QueueFull."""
        with self._lock:
            self.scheduler.submit(requests)

    def cancel(self, req: CoreRequest) -> None:
        """The client went away: a waiting request leaves now, a running one at the next step."""
        with self._lock:
            self.scheduler.cancel(req)
            if req.status is not Status.RUNNING:  # left now (it waited): nothing of it will be recomputed
                self._replaying.discard(req)

    def abort(self, req: CoreRequest) -> None:
        """The output side ended `req` (a stop string): it leaves the batch at the next step."""
        with self._lock:
            self._aborts.append(req)

    def drain_all(self) -> list[CoreRequest]:
        """Every request still waiting or running, removed (finish reason "error"); the running ones leave
        the batch at the next step."""
        with self._lock:
            running = list(self.scheduler.running)
            everyone = self.scheduler.drain_all()
            self._aborts += running
            self._replaying.clear()
        return everyone

    def step(self, now: float | None = None) -> CoreStep:
        """One step: leave, join, run; `now` (perf_counter) judges the deadlines."""
        out = CoreStep()
        with self._lock:
            aborts, self._aborts = self._aborts, []
            for r in aborts:  # first: what they held is free for this step's admissions
                self.scheduler.finish(r, "aborted")
            late_waiting, late_running = self.scheduler.expire(time.perf_counter() if now is None else now)
            evict, preempt, admit = self.scheduler.schedule()
        out.expired, out.preempted = late_waiting + late_running, preempt
        for r in late_waiting:
            self._replaying.discard(r)
        for r in (*aborts, *late_running, *evict):
            self.batch.remove(r)
            self._replaying.discard(r)
        for r in preempt:
            slot = self.batch.remove(r)
            if slot is not None:  # its steps so far were reported: their recomputation will not be
                r.replay = max(r.replay, slot.steps_done)
            if r.replay:
                self._replaying.add(r)
        for r in admit:
            try:
                self.batch.add(r.prompt_ids, r.plan, handle=r)
                out.admitted.append(r)
            except Exception as e:  # noqa: BLE001 - one request the batch refuses must not stop the others
                with self._lock:
                    self.scheduler.finish(r, "error")
                out.not_started.append((r, e))
        out.batch_size = len(self.batch)
        if not out.batch_size:
            return out
        t0 = time.perf_counter()
        try:
            out.events = self.batch.step()
        except Exception as e:  # noqa: BLE001 - this step's requests fail; the core keeps serving
            out.error = e
            with self._lock:
                out.failed = list(self.scheduler.running)
                for r in out.failed:
                    self.scheduler.finish(r, "error")
            for r in out.failed:
                self.batch.remove(r)
                self._replaying.discard(r)
            return out
        out.duration = time.perf_counter() - t0
        if self._replaying:
            out.events = self._unreported(out)
        with self._lock:
            for ev in out.events:
                if ev.done:  # its slot is free already: the next step may admit into it
                    self.scheduler.finish(ev.handle, ev.finish_reason or "length")
        return out

    def _unreported(self, out: CoreStep) -> list[SlotStep]:
        """The step's events less the recomputed steps of preempted requests, which their consumers had before
        the preemption (an event that finishes a request is always reported)."""
        events = []
        for ev in out.events:
            r = ev.handle
            if r in self._replaying:
                if ev.step < r.replay and not ev.done:
                    out.replayed += 1
                    continue
                self._replaying.discard(r)
            events.append(ev)
        return events
