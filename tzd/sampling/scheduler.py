"""Admission: a bounded waiting queue and the running set, reshuffled at every step boundary.

A request runs when it is first in line (lowest `priority`, then arrival) and every budget has room:
a slot (--max-batch-size), the columns one step runs (--max-num-batched-tokens; a request costs its
canvas, prompt + max_tokens, the columns of its full forward) and the free pages of the KV cache (a
request that uses the cache holds its canvas's pages while it runs). The first in line that does not
fit waits, and so does everyone behind it: a large request is never starved by smaller ones. A request
larger than the whole token budget runs alone, once nothing else runs; one larger than the whole KV
cache is refused before it is queued (the server's check_fits) or fails to start (offline generate()).

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
            key = (req.priority, next(self._arrivals))
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

    def _fits(self, req: CoreRequest) -> bool:
        if len(self.running) >= self.max_running:
            return False
        if self.max_pages is not None and self.running_pages + self.page_cost(req) > self.max_pages:
            return False
        if self.max_tokens is None or not self.running:  # alone it always runs, however large
            return True
        return self.running_tokens + self.cost(req) <= self.max_tokens

    def schedule(self) -> tuple[list[CoreRequest], list[CoreRequest]]:
        """(evict, admit) for the next step: cancelled requests out, then the first in line while it fits."""
        evict = [r for r in self.running if r.cancelled]
        for r in evict:
            self.finish(r, "cancelled")
        admit: list[CoreRequest] = []
        while self.waiting and self._fits(self.waiting[0]):
            req = self.waiting.pop(0)
            del self._keys[0]
            self.running[req] = cost = (self.cost(req), self.page_cost(req))
            self.running_tokens += cost[0]
            self.running_pages += cost[1]
            req.status = Status.RUNNING
            admit.append(req)
        return evict, admit

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
        """`req` no longer runs (finished, failed, evicted), for `reason`; idempotent (the first reason stays)."""
        cost = self.running.pop(req, None)
        if cost is not None:
            self.running_tokens -= cost[0]
            self.running_pages -= cost[1]
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
