"""Waiting for a request group's results, with the client's disconnect freeing its slots; event streams.

SSE framing, keep-alive comments and disconnect detection are sse-starlette's: a route's generator yields
`sse(data, event)` items and returns `stream_response(http, generator)`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import Request as HttpRequest
from sse_starlette import EventSourceResponse, ServerSentEvent

from server.engine import Engine
from server.middleware import record
from server.output import Result
from server.request import ClientGone, RequestGroup

SSE_HEADERS = {"Cache-Control": "no-cache"}  # sse-starlette adds X-Accel-Buffering: no (proxies must not buffer)
SEP = "\n"  # lines end in LF, as before sse-starlette (its default is CRLF; both are valid SSE)
KEEPALIVE = "keep-alive"


def sse(data: str, event: str | None = None) -> ServerSentEvent:
    """One server-sent event (the data is a single JSON line)."""
    return ServerSentEvent(data=data, event=event, sep=SEP)


def stream_response(http: HttpRequest, events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    """`events` as text/event-stream, with a comment line every --sse-keepalive seconds (while the request
    waits for a slot or between slow steps: proxies cut connections that stay silent)."""
    keepalive = http.app.state.serving.config.sse_keepalive
    return EventSourceResponse(events, headers=SSE_HEADERS, sep=SEP, ping=keepalive,
                               ping_message_factory=lambda: ServerSentEvent(comment=KEEPALIVE, sep=SEP))


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
