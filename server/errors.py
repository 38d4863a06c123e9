"""Errors as HTTP answers: one error type, ApiError (status, code, param), and one body for every failure
({"error": {message, type, param, code, request_id}}, OpenAI's shape plus the request's id).

The server's own refusals are ApiError subclasses that only fix the defaults (InvalidRequest is a 400 naming
its field, QueueFull a 429 with Retry-After, ...), so one handler renders them all; FastAPI's validation
errors and Starlette's 404/405 are turned into an ApiError by the other two, and any other exception (a
bug) is a 500 with the same body from server.middleware.RequestContext.
`error_responses(...)` documents the same bodies in the OpenAPI spec.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from clients.protocol import ErrorBody, ErrorDetail

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable"}
REQUEST_ID_KEY = "request_id"  # scope["state"][REQUEST_ID_KEY]: set by server.middleware.RequestContext
ERROR_KEY = "error"  # scope["state"][ERROR_KEY]: the error answer's code or field, for the access log


class ApiError(Exception):
    """A request the server refuses or cannot finish; `reason` (if any) labels tzd_rejected_total."""

    status: int = 500
    code: str | None = None
    reason: str | None = None

    def __init__(self, status: int | None = None, message: str = "", param: str | None = None,
                 code: str | None = None, reason: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status if status is not None else type(self).status
        self.message, self.param = message, param
        self.code = code if code is not None else type(self).code
        self.reason = reason if reason is not None else type(self).reason
        self.headers = headers

    def body(self, request_id: str | None = None) -> ErrorBody:
        return error_body(self.status, self.message, self.param, self.code, request_id)

    def response(self, request: Request) -> JSONResponse:
        """The answer to `request`: the body with its id; the access log learns the code or the field."""
        state = request.scope.setdefault("state", {})
        state[ERROR_KEY] = self.code or (f"param={self.param}" if self.param else None)
        return JSONResponse(self.body(state.get(REQUEST_ID_KEY)).model_dump(), status_code=self.status,
                            headers=self.headers)


class InvalidRequest(ApiError):
    """A request this model or server cannot run (400); `param` names the field."""

    status, reason = 400, "invalid"

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message=message, param=param)


class QueueFull(ApiError):
    """No room in the waiting queue (429): retry later."""

    status, code, reason = 429, "queue_full", "queue_full"

    def __init__(self, message: str) -> None:
        super().__init__(message=f"{message}: retry later", headers={"Retry-After": "1"})


class Unavailable(ApiError):
    """The engine takes no new requests (503): loading, draining or dead; `state` says which."""

    status = 503

    def __init__(self, state: str) -> None:
        super().__init__(message=f"the server is {state}: not accepting requests", code=state, reason=state,
                         headers={"Retry-After": "5"})
        self.state = state


class RequestFailed(ApiError):
    """The engine could not finish a request (a step raised, shutdown timed out, the engine died)."""

    status, code = 500, "generation_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message=message)


class ClientGone(ApiError):
    """The client disconnected; its requests were cancelled (499: nobody reads the answer)."""

    status, code = 499, "client_gone"

    def __init__(self) -> None:
        super().__init__(message="the client went away")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               request_id: str | None = None) -> ErrorBody:
    return ErrorBody(error=ErrorDetail(message=message, type=ERROR_TYPES.get(status, "server_error"),
                                       param=param, code=code, request_id=request_id))


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


def request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get(REQUEST_ID_KEY)


def install_error_handlers(app: FastAPI, on_reject: Callable[[str], None]) -> None:
    """Every error the app can raise answers with the error body; `on_reject(reason)` counts refusals."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        if exc.reason:
            on_reject(exc.reason)
        if isinstance(exc, ClientGone):
            return Response(status_code=499)  # nobody reads it: the client is gone
        return exc.response(request)

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def _invalid(request: Request, exc: RequestValidationError | ValidationError) -> Response:
        message, param = describe_validation(list(exc.errors()))
        return await _api_error(request, InvalidRequest(param, message))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return ApiError(exc.status_code, detail, headers=exc.headers).response(request)

    # any other exception is a bug: server.middleware.RequestContext answers it with a 500 error body (it
    # runs outside Starlette's exception handlers, so that this answer carries X-Request-Id too)


# ---- the OpenAPI side: which error answers an operation documents ------------------------------------

ERROR_DESCRIPTIONS = {
    400: "Invalid request: `error.param` names the field (also malformed JSON, a field this model cannot run)",
    401: "Missing or wrong API key (`Authorization: Bearer <key>`)",
    404: "Not found (for /v1: a `model` this server does not serve)",
    413: "Request body over --max-body-bytes",
    429: "The queue is full, or this API key is over one of its limits (`error.code`): wait Retry-After seconds",
    500: "The generation failed (a denoising step raised, or the server shut down first)",
    503: "Loading, draining or dead (`error.code`): wait Retry-After seconds",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "required": True,
                               "schema": {"type": "integer"}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entries of a route (or router) that can answer with these error statuses.

    Each documents the error body (ErrorBody) and, for 429 and 503, the Retry-After header. Merge it with a
    route's own entries: `responses={**error_responses(400, 413, 429, 500, 503), 200: {...}}`.
    """
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[status]}
        if status in (429, 503):
            entry["headers"] = RETRY_AFTER
        out[status] = entry
    return out


# what every generating route can answer (the auth dependency's 401 comes from the router)
GENERATION_ERRORS = error_responses(400, 413, 429, 500, 503)
