"""Admission: a bounded waiting queue and the running set, reshuffled at every step boundary."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from server.errors import QueueFull
from server.request import Request

__all__ = ["QueueFull", "Scheduler"]


class Scheduler:
    """FIFO admission into at most `max_running` slots; at most `max_waiting` requests wait."""

    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running, self.max_waiting = max_running, max_waiting
        self.waiting: deque[Request] = deque()
        self.running: dict[Request, None] = {}  # insertion-ordered set

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def submit(self, requests: Sequence[Request]) -> None:
        """Queue all of `requests` or none (one HTTP call's choices share a fate)."""
        if len(self.waiting) + len(requests) > self.max_waiting:
            raise QueueFull(f"the queue is full ({len(self.waiting)} of {self.max_waiting} waiting)")
        self.waiting.extend(requests)

    def cancel(self, req: Request) -> None:
        """A waiting request leaves now; a running one is evicted at the next step boundary."""
        req.cancelled = True
        if req in self.waiting:
            self.waiting.remove(req)

    def schedule(self) -> tuple[list[Request], list[Request]]:
        """(evict, admit) for the next step: cancelled requests out, waiting ones into the free slots."""
        evict = [r for r in self.running if r.cancelled]
        for r in evict:
            del self.running[r]
        admit: list[Request] = []
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting.popleft()
            self.running[req] = None
            admit.append(req)
        return evict, admit

    def expire(self, now: float) -> tuple[list[Request], list[Request]]:
        """(waiting, running) requests past their deadline, removed (the running ones leave the batch next)."""
        late_waiting = [r for r in self.waiting if r.deadline is not None and r.deadline <= now]
        late_running = [r for r in self.running if r.deadline is not None and r.deadline <= now]
        for r in late_waiting:
            self.waiting.remove(r)
        for r in late_running:
            del self.running[r]
        return late_waiting, late_running

    def finish(self, req: Request) -> None:
        self.running.pop(req, None)

    def drain_all(self) -> list[Request]:
        """Every request still here (waiting or running), removed: for shutdown or a dead engine."""
        everyone = [*self.running, *self.waiting]
        self.running.clear()
        self.waiting.clear()
        return everyone
