"""Typed exceptions of the SDK: every failure a caller can see, carrying the server's message.

TZDError
 └─ APIError                  status, message, type, param, code (the server's error body)
     ├─ BadRequest            400/404/405/413/422, or a parameter refused client-side; .param names the field
     ├─ AuthenticationError   401/403
     ├─ RateLimited           429 (queue full); .retry_after in seconds, if the server sent one
     └─ ServerUnavailable     503 (loading, draining), or no answer at all; .retry_after
         └─ APIConnectionError    the server could not be reached or the connection broke
             ├─ APITimeout        no answer within the timeout
             └─ StreamInterrupted a stream broke or ended before its final event
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any


class TZDError(Exception):
    """Base class of every exception the SDK raises."""


class APIError(TZDError):
    """The server refused or failed a request; `status` is None when no HTTP status applies."""

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None,
                 param: str | None = None, code: str | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code, self.body = \
            message, status, type, param, code, body

    def __str__(self) -> str:
        return f"{self.status}: {self.message}" if self.status is not None else self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status={self.status!r}, param={self.param!r})"


class BadRequest(APIError):
    """The request is invalid: `param` names the offending field (checked client-side or by the server)."""


class AuthenticationError(APIError):
    """Missing or wrong API key."""


class _RetryAfter(APIError):
    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class RateLimited(_RetryAfter):
    """The server's queue is full (429); `retry_after` is the wait it asked for, in seconds."""


class ServerUnavailable(_RetryAfter):
    """The server cannot take requests now: loading or draining (503), or unreachable."""


class APIConnectionError(ServerUnavailable):
    """No complete HTTP answer: the connection could not be made or broke; `sent` says whether the request
    may have reached the server (a generation that may have run is not retried)."""

    sent: bool = True


class APITimeout(APIConnectionError):
    """The server did not answer within the configured timeout."""


class StreamInterrupted(APIConnectionError):
    """A stream broke (connection lost, malformed event) or ended before its `done` event."""


_BY_STATUS: dict[int, type[APIError]] = {400: BadRequest, 404: BadRequest, 405: BadRequest, 413: BadRequest,
                                         422: BadRequest, 401: AuthenticationError, 403: AuthenticationError,
                                         429: RateLimited, 503: ServerUnavailable}
_BY_TYPE: dict[str, type[APIError]] = {"invalid_request_error": BadRequest, "authentication_error":
                                       AuthenticationError, "rate_limit_error": RateLimited,
                                       "service_unavailable": ServerUnavailable}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_from_body(status: int | None, body: Any, headers: Mapping[str, str] | None = None,
                    fallback: str = "") -> APIError:
    """The typed exception for an error answer: the body's {"error": {...}} if it has one, else `fallback`."""
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        detail = {}
    message = str(detail.get("message") or fallback or (f"HTTP {status}" if status else "request failed"))
    etype = detail.get("type") if isinstance(detail.get("type"), str) else None
    cls = _BY_STATUS.get(status) if status is not None else None
    if cls is None:
        cls = _BY_TYPE.get(etype or "", APIError) if status is None or status < 500 else APIError
    kw: dict[str, Any] = {"status": status, "type": etype, "param": detail.get("param"),
                          "code": detail.get("code"), "body": body}
    if issubclass(cls, _RetryAfter):
        kw["retry_after"] = parse_retry_after((headers or {}).get("retry-after"))
    return cls(message, **kw)
