"""API keys: `Authorization: Bearer <key>` on /generate and /v1/*, compared in constant time, each key held
to its limits (server.keys) for as long as its request runs."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import ApiError
from server.keys import ApiKey, KeyLimiter
from server.middleware import record

BEARER = HTTPBearer(auto_error=False, scheme_name="bearer",
                    description="An API key of --api-key / --api-key-file, as `Authorization: Bearer <key>`")


def bearer_auth(keys: Sequence[ApiKey], limiter: KeyLimiter) -> Callable[..., None]:
    """A FastAPI dependency that accepts any of `keys` within its limits; no keys = open server (and no
    security in the spec).

    With keys, the dependency goes through FastAPI's HTTPBearer, so that the OpenAPI document declares the
    bearer scheme on exactly the operations that need it (server.openapi adds their 401 answer). A request
    admitted under a key holds it (concurrency) until its answer has been sent; then its tokens count
    against the key's tokens per minute.
    """
    encoded = [(k.key.encode(), k) for k in keys]
    if not encoded:
        def open_server() -> None:
            return None
        return open_server

    def check(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
              ) -> None:
        given = credentials.credentials.strip().encode() if credentials is not None else b""
        # compare with every key, without stopping early, so timing says nothing about which one was close
        found: ApiKey | None = None
        for secret, key in encoded:
            if hmac.compare_digest(given, secret):
                found = key
        if found is None:
            raise ApiError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key", reason="unauthorized", headers={"WWW-Authenticate": "Bearer"})
        rec = record(request)
        rec.key = found.name
        limiter.admit(found)  # KeyLimitExceeded: 429 naming the limit, with Retry-After

        def release() -> None:
            usage = rec.summary()
            limiter.release(found, usage.get("prompt_tokens", 0) + usage.get("generated_tokens", 0))

        rec.on_end.append(release)

    return check
