"""Per-request state, and the group of requests one HTTP call made (OpenAI's n and prompt lists)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.errors import ClientGone, RequestFailed
from server.output import RequestOutput, Update
from tzd.sampling import RequestPlan

__all__ = ["CANCELLED", "ClientGone", "Failure", "Request", "RequestFailed", "RequestGroup"]


@dataclass
class Failure:
    message: str


CANCELLED = object()  # queued to wake a waiting handler when its client went away


@dataclass(eq=False)  # identity semantics: the request object is its own handle in the batch
class Request:
    prompt_ids: list[int]
    plan: RequestPlan
    output: RequestOutput
    group: RequestGroup
    index: int = 0  # choice index within the group
    arrival: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_step: float | None = None
    finished: float | None = None
    cancelled: bool = False
    nfe: int = 0  # forward passes counted so far (for tzd_forward_passes_total)
    generated: int = 0  # tokens of its result, once finished
    finish_reason: str | None = None  # of its result, once finished

    @property
    def done(self) -> bool:
        return self.finished is not None


class RequestGroup:
    """The requests of one HTTP call (its prompts, each `n` times in a row); their updates arrive, tagged,
    on one queue. `request_id` is the HTTP request's X-Request-Id, for the engine's log lines."""

    def __init__(self, prefix: str, n: int = 1, request_id: str | None = None) -> None:
        self.n, self.request_id = n, request_id
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.requests: list[Request] = []
        self.queue: asyncio.Queue[tuple[Request, Update | Failure] | object] = asyncio.Queue()

    def add(self, prompt_ids: list[int], plan: RequestPlan, output: RequestOutput) -> Request:
        req = Request(prompt_ids, plan, output, self, index=len(self.requests))
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
