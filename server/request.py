"""Per-request state, and the group of requests one HTTP call made (OpenAI's n and prompt lists)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.errors import ClientGone, RequestFailed
from server.output import RequestOutput, Update
from tzd.sampling import RequestPlan
from tzd.sampling.scheduler import CoreRequest

__all__ = ["CANCELLED", "STREAM_BACKLOG", "ClientGone", "Failure", "Request", "RequestFailed", "RequestGroup",
           "UpdateQueue"]

STREAM_BACKLOG = 8  # unread updates kept per request; later ones are merged into the last (see UpdateQueue)


@dataclass
class Failure:
    message: str


CANCELLED = object()  # queued to wake a waiting handler when its client went away


@dataclass(eq=False, kw_only=True)  # identity semantics: the request object is its own handle in the batch
class Request(CoreRequest):
    """A request as the server serves it: the core's record (prompt, plan, priority, deadline, status)
    with the HTTP side: its output renderer, its group (the HTTP call) and the timings the metrics read."""

    output: RequestOutput
    group: RequestGroup
    index: int = 0  # choice index within the group
    arrival: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_step: float | None = None
    finished: float | None = None
    nfe: int = 0  # forward passes counted so far (for tzd_forward_passes_total)
    generated: int = 0  # tokens of its result, once finished
    finish_reason: str | None = None  # of its result, once finished

    @property
    def done(self) -> bool:
        return self.finished is not None


Item = tuple[Request, Update | Failure] | object  # an update for one request, or CANCELLED


class UpdateQueue:
    """A group's updates for its HTTP handler, bounded however slowly the client reads.

    Each request keeps at most `backlog` unread updates; a later one is merged into the last of them
    (Update.merged: the latest canvas, the committed tokens of both, the deltas joined), so a reader that
    falls behind gets fewer, coalesced step events and never an unbounded queue. Results and failures
    are never merged away. One reader (the handler), many puts (the engine's dispatch, on the loop).
    """

    def __init__(self, backlog: int = STREAM_BACKLOG) -> None:
        self.backlog = backlog
        self._items: deque[Item] = deque()
        self._unread: Counter[Request] = Counter()
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[Item]:
        return list(self._items)

    def put_nowait(self, item: Item) -> bool:
        """Queue `item`; True if it was merged into an unread update instead."""
        if item is not CANCELLED:
            req, up = item  # type: ignore[misc]
            if isinstance(up, Update) and self._unread[req] >= self.backlog and self._merge(req, up):
                return True
            self._unread[req] += 1
        self._items.append(item)
        self._ready.set()
        return False

    def _merge(self, req: Request, up: Update) -> bool:
        for i in range(len(self._items) - 1, -1, -1):
            queued = self._items[i]
            if queued is not CANCELLED and queued[0] is req:  # type: ignore[index]
                last = queued[1]  # type: ignore[index]
                if isinstance(last, Update) and last.result is None:
                    self._items[i] = (req, last.merged(up))
                    return True
                return False
        return False

    async def get(self) -> Item:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if item is not CANCELLED:
            self._unread[item[0]] -= 1  # type: ignore[index]
        return item


class RequestGroup:
    """The requests of one HTTP call (its prompts, each `n` times in a row); their updates arrive, tagged,
    on one queue. `request_id` is the HTTP request's X-Request-Id, for the engine's log lines."""

    def __init__(self, prefix: str, n: int = 1, request_id: str | None = None) -> None:
        self.n, self.request_id = n, request_id
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.requests: list[Request] = []
        self.queue = UpdateQueue()

    def add(self, prompt_ids: list[int], plan: RequestPlan, output: RequestOutput) -> Request:
        req = Request(prompt_ids, plan, output=output, group=self, index=len(self.requests))
        self.requests.append(req)
        return req

    async def updates(self) -> AsyncIterator[tuple[Request, Update]]:
        """Each request's updates until all have a result; raises RequestFailed or ClientGone."""
        pending = len(self.requests)
        while pending:
            item = await self.queue.get()
            if item is CANCELLED:
                raise ClientGone()
            req, up = item  # type: ignore[misc]
            if isinstance(up, Failure):
                raise RequestFailed(up.message)
            if up.result is not None:
                pending -= 1
            yield req, up
