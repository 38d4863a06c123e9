"""Per-request state, and the group of requests one HTTP call made (OpenAI's n and prompt lists)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.output import RequestOutput, Update
from tzd.sampling import RequestPlan


class RequestFailed(Exception):
    """The engine could not finish a request (a step raised, shutdown timed out, the engine died)."""


class ClientGone(Exception):
    """The client disconnected; its requests were cancelled."""


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

    @property
    def done(self) -> bool:
        return self.finished is not None


class RequestGroup:
    """The requests of one HTTP call; their updates arrive, tagged, on one queue."""

    def __init__(self, prefix: str) -> None:
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
