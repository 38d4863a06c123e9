"""Waiting for a request group's results, with the client's disconnect freeing its slots; SSE framing."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import Request as HttpRequest

from server.engine import Engine
from server.middleware import record
from server.output import Result
from server.request import ClientGone, RequestGroup

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: str, event: str | None = None) -> str:
    """One server-sent event (the data is a single JSON line)."""
    return f"event: {event}\ndata: {data}\n\n" if event else f"data: {data}\n\n"


def set_outcome(http: HttpRequest, outcome: str) -> None:
    """Label tzd_requests_total for an answer whose HTTP status does not tell its end (streams, 499)."""
    record(http).outcome = outcome


def track(http: HttpRequest, group: RequestGroup) -> None:
    """Let the access log line report the group's tokens and queue time."""
    record(http).group = group


async def _wait_disconnect(http: HttpRequest) -> None:
    # the body has been read, so the next ASGI message is the disconnect (or the end of the response)
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def collect(engine: Engine, group: RequestGroup, http: HttpRequest) -> list[Result]:
    """Every request's result, in order; a client that goes away cancels them (ClientGone)."""
    watcher = asyncio.create_task(_wait_disconnect(http))

    def gone(task: asyncio.Task) -> None:
        if not task.cancelled():
            task.exception()  # a failed receive also means the client is unreachable
            engine.cancel(group)

    watcher.add_done_callback(gone)
    track(http, group)
    results: dict[int, Result] = {}
    try:
        async for req, up in group.updates():
            if up.result is not None:
                results[req.index] = up.result
        return [results[i] for i in range(len(group.requests))]
    except ClientGone:
        set_outcome(http, "499")
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if len(results) < len(group.requests):
            engine.cancel(group)  # a failed sibling: the others stop too
