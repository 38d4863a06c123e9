"""API keys: `Authorization: Bearer <key>` on /generate and /v1/*, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import ApiError

BEARER = HTTPBearer(auto_error=False, scheme_name="bearer",
                    description="An API key of --api-key / --api-key-file, as `Authorization: Bearer <key>`")


def bearer_auth(keys: Sequence[str]) -> Callable[..., None]:
    """A FastAPI dependency that accepts any of `keys`; no keys = open server (and no security in the spec).

    With keys, the dependency goes through FastAPI's HTTPBearer, so that the OpenAPI document declares the
    bearer scheme on exactly the operations that need it (server.openapi adds their 401 answer).
    """
    encoded = [k.encode() for k in keys]
    if not encoded:
        def open_server() -> None:
            return None
        return open_server

    def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        given = credentials.credentials.strip().encode() if credentials is not None else b""
        # compare with every key, without stopping early, so timing says nothing about which one was close
        ok = False
        for key in encoded:
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise ApiError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key", reason="unauthorized", headers={"WWW-Authenticate": "Bearer"})

    return check
