"""ASGI middleware: the request's id and its access log line, tzd_requests_total, the body size limit."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ERROR_KEY, REQUEST_ID_KEY, error_body
from server.metrics import Metrics

COUNTED = {"/generate": "generate", "/v1/completions": "completions", "/v1/models": "models",
           "/v1/chat/completions": "chat_completions"}
QUIET = ("/health", "/metrics", "/playground/")  # polled: their access lines are DEBUG, not INFO
RECORD_KEY = "tzd_record"  # scope["state"][RECORD_KEY]: the RequestRecord the routes fill in
REQUEST_ID_HEADER = b"x-request-id"
USABLE_ID = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII: safe in a header, a log line and JSON

access_log = logging.getLogger("tzd.access")
log = logging.getLogger("tzd.server")


async def send_json(send: Send, status: int, body: bytes) -> None:
    """A whole JSON answer through `send`."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@dataclass
class RequestRecord:
    """What one request's access log line says beyond method, route and status; routes fill it in."""

    request_id: str
    outcome: str | None = None  # set where the HTTP status does not tell the end: "error", "499", "timeout"
    key: str | None = None  # the API key's id (never the key): see server.auth
    error: str | None = None  # an error answer's code, else the field it named (see server.errors)
    group: Any = None  # the RequestGroup it made (server.request), for tokens and queue time
    on_end: list[Callable[[], None]] = field(default_factory=list)  # run once the answer is sent

    def summary(self) -> dict[str, Any]:
        """Tokens and queue time of the generation, if there was one."""
        g = self.group
        if g is None or not g.requests:
            return {}
        queue = [r.admitted - r.arrival for r in g.requests if r.admitted is not None]
        return {"prompt_tokens": sum(len(r.prompt_ids) for r in g.requests[::g.n]),
                "generated_tokens": sum(r.generated for r in g.requests),
                "queue_s": round(max(queue), 4) if queue else None,
                "finish_reasons": sorted({r.finish_reason for r in g.requests if r.finish_reason})}


def record(http: HttpRequest) -> RequestRecord:
    """The current request's record (RequestContext puts one in every HTTP scope)."""
    return http.scope["state"][RECORD_KEY]


def incoming_request_id(scope: Scope) -> str:
    """The client's X-Request-Id when usable, else a new one."""
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER:
            text = value.decode("latin-1").strip()
            if USABLE_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


def outcome_of(status: int, stream_outcome: str | None, finish_reasons: list[str]) -> str:
    """ok | timeout | rejected | cancelled | error: how the request ended, for the access log."""
    if stream_outcome == "499" or status == 499:
        return "cancelled"
    if stream_outcome == "error" or (status >= 500 and status != 503):
        return "error"
    if status >= 400:  # refused: bad request, no key, over a limit, full queue, loading or draining (503)
        return "rejected"
    return "timeout" if "timeout" in finish_reasons else "ok"


class RequestContext:
    """Outermost: gives every HTTP request an id (X-Request-Id, echoed on the answer), counts it in
    tzd_requests_total{endpoint, status} and logs one access line when its answer has been sent.

    While `closing()` is true (the server drains after SIGTERM) every answer carries `Connection: close`:
    a keep-alive connection left idle to a replica that is about to exit is where a load balancer sends its
    next request just as the socket closes, and that request then gets no answer at all.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, closing: Callable[[], bool] = lambda: False) -> None:
        self.app, self.metrics, self.closing = app, metrics, closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        rec = RequestRecord(incoming_request_id(scope))
        state = scope.setdefault("state", {})
        state[REQUEST_ID_KEY], state[RECORD_KEY] = rec.request_id, rec
        status = {"code": 500, "started": False}
        id_header = (REQUEST_ID_HEADER, rec.request_id.encode())

        async def tracked_send(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status["code"], status["started"] = msg["status"], True
                headers = [(k, v) for k, v in msg.get("headers", ()) if k.lower() != REQUEST_ID_HEADER]
                headers.append(id_header)
                if self.closing():
                    headers = [(k, v) for k, v in headers if k.lower() != b"connection"]
                    headers.append((b"connection", b"close"))
                msg = {**msg, "headers": headers}
            await send(msg)

        try:
            await self.app(scope, receive, tracked_send)
        except ClientDisconnect:  # gone while its body was read: nobody to answer
            rec.outcome = "499"
        except Exception as exc:  # a bug: answer 500 with the error body if nothing was sent yet
            if status["started"]:
                raise
            log.exception("unhandled error on %s %s (request id %s)", scope.get("method"), scope.get("path"),
                          rec.request_id)
            err = error_body(500, f"internal server error: {type(exc).__name__}", request_id=rec.request_id)
            await send_json(tracked_send, 500, err.model_dump_json().encode())
        finally:
            for fn in rec.on_end:
                fn()
            rec.error = rec.error or state.get(ERROR_KEY)
            path = scope.get("path", "")
            endpoint = COUNTED.get(path)
            if endpoint is not None:
                self.metrics.requests.labels(endpoint, rec.outcome or str(status["code"])).inc()
            self._log(scope, rec, status["code"], time.perf_counter() - t0)

    @staticmethod
    def _log(scope: Scope, rec: RequestRecord, status: int, total: float) -> None:
        path = scope.get("path", "")
        level = logging.DEBUG if path.startswith(QUIET) else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        route = getattr(scope.get("route"), "path", None) or path
        usage = rec.summary()
        fields = {"request_id": rec.request_id, "method": scope.get("method"), "route": route, "status": status,
                  "outcome": outcome_of(status, rec.outcome, usage.pop("finish_reasons", [])), **usage,
                  "total_s": round(total, 4), "key": rec.key, "error": rec.error}
        text = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        access_log.log(level, "%s", text, extra={k: v for k, v in fields.items() if v is not None})


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
            return await self._reject(scope, send)
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
                await self._reject(scope, send, count=False)

    async def _reject(self, scope: Scope, send: Send, count: bool = True) -> None:
        if count:
            self.metrics.rejected.labels("too_large").inc()
        rid = scope.get("state", {}).get(REQUEST_ID_KEY)
        body = error_body(413, BodyTooLarge(self.max_bytes).detail, request_id=rid)
        await send_json(send, 413, body.model_dump_json().encode())
