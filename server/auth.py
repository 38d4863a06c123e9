"""API keys: `Authorization: Bearer <key>` on /generate and /v1/*, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence

from fastapi import Request

from server.errors import ApiError


def bearer_auth(keys: Sequence[str]) -> Callable[[Request], None]:
    """A FastAPI dependency that accepts any of `keys`; no keys = open server."""
    encoded = [k.encode() for k in keys]

    def check(request: Request) -> None:
        if not encoded:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        # compare with every key, without stopping early, so timing says nothing about which one was close
        ok = False
        for key in encoded:
            ok |= hmac.compare_digest(given, key)
        if scheme.lower() != "bearer" or not ok:
            raise ApiError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key", reason="unauthorized", headers={"WWW-Authenticate": "Bearer"})

    return check
