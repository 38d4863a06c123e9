"""Errors as HTTP answers: one OpenAI-style body ({"error": {message, type, param, code}}) for every failure."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from clients.protocol import ErrorBody, ErrorDetail
from server.engine import Unavailable
from server.prepare import InvalidRequest
from server.request import RequestFailed
from server.scheduler import QueueFull

log = logging.getLogger("tzd.server")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable"}


class ApiError(Exception):
    """A request the server refuses or cannot finish; `reason` (if any) labels tzd_rejected_total."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 reason: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.reason, self.headers = reason, headers

    def body(self) -> ErrorBody:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorBody:
    return ErrorBody(error=ErrorDetail(message=message, type=ERROR_TYPES.get(status, "server_error"),
                                       param=param, code=code))


def error_response(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def describe_validation(errors: list[Any]) -> tuple[str, str | None]:
    """(message, param) for pydantic errors: the first error, named by its top-level field."""
    if not errors:
        return "invalid request", None
    err = errors[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    if not loc:
        return f"request body: {err.get('msg')}", None
    param = str(loc[0])
    where = param + "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))
    # a union reports one error per branch: name them all so the message says what would be accepted
    msgs = [str(e.get("msg", "invalid value")).removeprefix("Value error, ") for e in errors
            if [p for p in e.get("loc", ()) if p != "body"][:1] == [loc[0]]]
    return f"{where}: {' or '.join(dict.fromkeys(msgs))}", param


def as_api_error(exc: Exception) -> ApiError:
    """The HTTP answer for the server's own exceptions (engine, admission, request checks)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc), param=exc.param, reason="invalid")
    if isinstance(exc, QueueFull):
        return ApiError(429, f"{exc}: retry later", code="queue_full", reason="queue_full",
                        headers={"Retry-After": "1"})
    if isinstance(exc, Unavailable):
        return ApiError(503, str(exc), code=exc.state, reason=exc.state, headers={"Retry-After": "5"})
    if isinstance(exc, RequestFailed):
        return ApiError(500, str(exc), code="generation_failed")
    raise TypeError(f"not a server error: {exc!r}")


def install_error_handlers(app: FastAPI, on_reject: Any) -> None:
    """Every error the app can raise answers with the error body; `on_reject(reason)` counts refusals."""
    @app.exception_handler(InvalidRequest)
    @app.exception_handler(QueueFull)
    @app.exception_handler(Unavailable)
    @app.exception_handler(RequestFailed)
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: Exception) -> JSONResponse:
        exc = as_api_error(exc)
        if exc.reason:
            on_reject(exc.reason)
        return error_response(exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def _invalid(request: Request, exc: RequestValidationError | ValidationError) -> JSONResponse:
        on_reject("invalid")
        message, param = describe_validation(list(exc.errors()))
        return error_response(400, error_body(400, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return error_response(exc.status_code, error_body(exc.status_code, detail), exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, error_body(500, f"internal server error: {type(exc).__name__}"))
