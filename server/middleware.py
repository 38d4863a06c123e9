"""ASGI middleware: the request body size limit, and tzd_requests_total by endpoint and outcome."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_body
from server.metrics import Metrics

COUNTED = {"/generate": "generate", "/v1/completions": "completions", "/v1/models": "models"}
OUTCOME_KEY = "tzd_outcome"  # a stream sets scope["state"][OUTCOME_KEY] when it ends otherwise than 200


class BodyTooLarge(HTTPException):
    """Raised from `receive`: FastAPI passes HTTPExceptions from body reading through to the handlers."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body too large: the limit is {max_bytes} bytes (--max-body-bytes)")


class BodyLimit:
    """413 for a body over `max_bytes`: by Content-Length up front, else counted as it arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    self.metrics.rejected.labels("too_large").inc()
                    raise BodyTooLarge(self.max_bytes)
            return msg

        async def tracked_send(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:  # read outside a route's body parsing: answer here
            if not started:
                await self._reject(send, count=False)

    async def _reject(self, send: Send, count: bool = True) -> None:
        if count:
            self.metrics.rejected.labels("too_large").inc()
        body = error_body(413, BodyTooLarge(self.max_bytes).detail).model_dump_json().encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class RequestCounter:
    """tzd_requests_total{endpoint, status}: the HTTP status, or the stream's own outcome (499, error)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = COUNTED.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            return await self.app(scope, receive, send)
        status: dict[str, Any] = {"code": "500"}

        async def tracked_send(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = str(msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, tracked_send)
        finally:
            outcome = scope.get("state", {}).get(OUTCOME_KEY)
            self.metrics.requests.labels(endpoint, outcome or status["code"]).inc()
