"""The admin bearer token, checked by a router-level dependency before any body is read, so a caller without
it learns nothing of a route's schema (the admin API and vLLM's adapter routes share it)."""
from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Request

from coserve.engine.api.errors import APIError


def admin_auth(token: str | None) -> Callable[[Request], None]:
    """A FastAPI dependency that refuses (403) when no token is configured and (401) a missing or wrong one."""
    def require_admin(request: Request) -> None:
        if not token:
            raise APIError(403, "the admin API is disabled: start the server with --admin-token-file "
                                "or COSERVE_ADMIN_TOKEN")
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise APIError(401, "missing or wrong admin bearer token")
    return require_admin
