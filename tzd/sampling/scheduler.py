"""Admission: a bounded waiting queue and the running set, reshuffled at every step boundary.

A request runs when it is first in line (lowest `priority`, then arrival) and every budget has room:
a slot (--max-batch-size), the columns one step runs (--max-num-batched-tokens; a request costs its
canvas, prompt + max_tokens, the columns of its full forward) and the free pages of the KV cache (a
request that uses the cache holds its canvas's pages while it runs). The first in line that does not
fit waits, and so does everyone behind it: a large request is never starved by smaller ones. A request
larger than the whole token budget runs alone, once nothing else runs; one larger than the whole KV
cache is refused before it is queued (the server's check_fits) or fails to start (offline generate()).

Preemption: when the first in line does not fit for want of slots or KV pages and requests of a lower
priority (a larger `priority`) run, the lowest of them (the latest arrival among equals) are preempted
until it fits, none that is not needed, and go back in line at their old place (status PREEMPTED) to be
recomputed from the start when they fit again. Their plan and seed are unchanged and every step is
batch-invariant, so the recomputation repeats their steps exactly; the core hides the steps their clients
already had (`replay`). A token budget alone never preempts (it bounds a step's cadence, not memory),
and equals never preempt each other.

The engine core (core.py) owns it: the server's engine and offline generate() admit through it alike.
A request is a CoreRequest (the server's Request extends it with the HTTP side): its status says where it
is, WAITING -> RUNNING -> FINISHED, with its finish reason.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tzd.sampling.params import RequestPlan

__all__ = ["CoreRequest", "QueueFull", "Scheduler", "Status"]


class QueueFull(Exception):
    """The waiting queue has no room for the requests (the server answers 429)."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # was running, waits again to be recomputed (back in line at its old place)
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: the request object is its own handle in the batch
class CoreRequest:
    """What the core keeps of a request: its prompt and plan, its place in the line, its status."""

    prompt_ids: list[int]
    plan: RequestPlan
    priority: int = 0  # admission order: lower first, ties by arrival (SamplingParams.priority)
    deadline: float | None = None  # perf_counter time past which it ends with finish_reason "timeout"
    cancelled: bool = False  # its client went away: it leaves (waiting now, running at the next step)
    status: Status = Status.WAITING
    # why it finished: "length" | "stop" (the sampler's), "timeout", "cancelled", "aborted" (the output side
    # ended it: a stop string), "error" (its step or its start failed); None until then
    reason: str | None = None
    handle: Any = None  # the caller's own tag (offline generate(): the prompt's index)
    order: int = -1  # its arrival in the line (the scheduler's): a preempted request goes back to its place
    replay: int = 0  # steps already reported before it was preempted: their recomputation is not reported
    preemptions: int = 0



class Scheduler:
    """Priority-then-FIFO admission into at most `max_running` slots and `max_tokens` columns (None: no
    token budget); at most `max_waiting` requests wait."""

    def __init__(self, max_running: int, max_waiting: int, max_tokens: int | None = None,
                 max_pages: int | None = None, pages: Callable[[CoreRequest], int] | None = None) -> None:
        """`max_pages`: the KV cache's pages (None: pages never limit), `pages(req)` those a request holds."""
        self.max_running, self.max_waiting, self.max_tokens = max_running, max_waiting, max_tokens
        self.max_pages, self.pages = max_pages, pages
        self.running_pages = 0
        self.waiting: list[CoreRequest] = []  # in admission order: sorted by (priority, arrival)
        self._keys: list[tuple[int, int]] = []  # the sort keys of `waiting`, for bisect
        self.running: dict[CoreRequest, tuple[int, int]] = {}  # insertion-ordered: request -> (columns, pages)
        self.running_tokens = 0
        self._arrivals = itertools.count()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @staticmethod
    def cost(req: CoreRequest) -> int:
        """Columns a request adds to a step: its canvas (prompt + max_tokens), what a full forward runs."""
        return req.plan.total_len

    def submit(self, requests: Sequence[CoreRequest]) -> None:
        """Queue all of `requests` or none (one HTTP call's choices share a fate)."""
        if len(self.waiting) + len(requests) > self.max_waiting:
            raise QueueFull(f"the queue is full ({len(self.waiting)} of {self.max_waiting} waiting)")
        for req in requests:
            req.order = next(self._arrivals)
            self._enqueue(req)

    def _enqueue(self, req: CoreRequest) -> None:
        key = (req.priority, req.order)
        i = bisect.bisect_right(self._keys, key)
        self._keys.insert(i, key)
        self.waiting.insert(i, req)

    def _unqueue(self, req: CoreRequest) -> None:
        i = self.waiting.index(req)
        del self.waiting[i], self._keys[i]

    def cancel(self, req: CoreRequest) -> None:
        """A waiting request leaves now; a running one is evicted at the next step boundary."""
        req.cancelled = True
        if req in self.waiting:
            self._unqueue(req)
            self._end(req, "cancelled")

    def page_cost(self, req: CoreRequest) -> int:
        return self.pages(req) if self.pages is not None else 0

    def _fits(self, req: CoreRequest, running: int = 0, tokens: int = 0, pages: int = 0) -> bool:
        """Whether `req` fits beside the running requests less `running` of them holding `tokens` columns
        and `pages` pages."""
        if len(self.running) - running >= self.max_running:
            return False
        if self.max_pages is not None and self.running_pages - pages + self.page_cost(req) > self.max_pages:
            return False
        if self.max_tokens is None or len(self.running) == running:  # alone it always runs, however large
            return True
        return self.running_tokens - tokens + self.cost(req) <= self.max_tokens

    def _victims(self, req: CoreRequest) -> list[CoreRequest]:
        """Running requests of a lower priority than `req` whose leaving lets it in: taken lowest priority
        first (the latest arrival among equals) until it fits, then any of them not needed given back; []
        if not even all of them make room."""
        if self.max_tokens is not None and self.running and \
                self.running_tokens + self.cost(req) > self.max_tokens:
            return []  # the token budget binds: it bounds a step's cadence, not memory, and never preempts
        lower = sorted((r for r in self.running if r.priority > req.priority),
                       key=lambda r: (r.priority, r.order), reverse=True)
        for n in range(1, len(lower) + 1):
            if self._fits_without(req, lower[:n]):
                picked = lower[:n]
                for r in lower[:n - 1]:  # a smaller one taken first may not be needed beside a larger one
                    rest = [x for x in picked if x is not r]
                    if self._fits_without(req, rest):
                        picked = rest
                return picked
        return []

    def _fits_without(self, req: CoreRequest, leaving: list[CoreRequest]) -> bool:
        costs = [self.running[r] for r in leaving]
        return self._fits(req, len(leaving), sum(c[0] for c in costs), sum(c[1] for c in costs))

    def _preempt(self, req: CoreRequest) -> None:
        cost = self.running.pop(req)
        self.running_tokens -= cost[0]
        self.running_pages -= cost[1]
        req.status = Status.PREEMPTED
        req.preemptions += 1
        self._enqueue(req)  # at its old place: behind whoever preempted it (a lower priority), by arrival

    def schedule(self) -> tuple[list[CoreRequest], list[CoreRequest], list[CoreRequest]]:
        """(evict, preempt, admit) for the next step: cancelled requests out, then the first in line while it
        fits, preempting lower priorities for it when slots or pages are what it lacks."""
        evict = [r for r in self.running if r.cancelled]
        for r in evict:
            self.finish(r, "cancelled")
        admit: list[CoreRequest] = []
        preempt: list[CoreRequest] = []
        while self.waiting:
            head = self.waiting[0]
            if not self._fits(head):
                victims = self._victims(head)
                if not victims:
                    break
                for r in victims:
                    self._preempt(r)
                preempt += victims
            self.waiting.pop(0)
            del self._keys[0]
            self.running[head] = cost = (self.cost(head), self.page_cost(head))
            self.running_tokens += cost[0]
            self.running_pages += cost[1]
            head.status = Status.RUNNING
            if head in preempt:  # preempted in this same call and fits again: it keeps its place in the batch
                preempt.remove(head)
                head.preemptions -= 1
            else:
                admit.append(head)
        return evict, preempt, admit

    def expire(self, now: float) -> tuple[list[CoreRequest], list[CoreRequest]]:
        """(waiting, running) requests past their deadline, removed (the running ones leave the batch next)."""
        late_waiting = [r for r in self.waiting if r.deadline is not None and r.deadline <= now]
        late_running = [r for r in self.running if r.deadline is not None and r.deadline <= now]
        for r in late_waiting:
            self._unqueue(r)
            self._end(r, "timeout")
        for r in late_running:
            self.finish(r, "timeout")
        return late_waiting, late_running

    def finish(self, req: CoreRequest, reason: str) -> None:
        """`req` no longer runs or waits (finished, failed, evicted), for `reason`; idempotent (the first
        reason stays)."""
        cost = self.running.pop(req, None)
        if cost is not None:
            self.running_tokens -= cost[0]
            self.running_pages -= cost[1]
        elif req.status is Status.PREEMPTED and req in self.waiting:  # back in line after a preemption
            self._unqueue(req)
        self._end(req, reason)

    @staticmethod
    def _end(req: CoreRequest, reason: str) -> None:
        if req.status is not Status.FINISHED:
            req.status, req.reason = Status.FINISHED, reason

    def drain_all(self) -> list[CoreRequest]:
        """Every request still here (waiting or running), removed: for shutdown or a dead engine."""
        everyone = [*self.running, *self.waiting]
        for r in everyone:
            self._end(r, "error")
        self.running.clear()
        self.waiting.clear()
        self._keys.clear()
        self.running_tokens = self.running_pages = 0
        return everyone
