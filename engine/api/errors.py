"""Every error the HTTP API answers has OpenAI's shape, {"error": {"message", "type", "param", "code"}}, where
`param` names the offending field: refusals, unknown routes, wrong methods, bad bodies and our own bugs."""
from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger("coserve.api")

KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
         415: "invalid_request_error", 503: "service_unavailable_error"}
# pydantic puts the union member it tried into an error's location ("str", "list[int]", ...); not a field
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*\])$")


class APIError(Exception):
    """A request refused with an HTTP status; `param` names the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, kind: str, param: str | None, code: int) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(exc: APIError, headers: dict[str, str] | None = None) -> Response:
    """ASCII-escaped JSON, so text echoed from a request can never fail to encode."""
    body = json.dumps(error_body(exc.message, exc.kind, exc.param, exc.status))
    return Response(body, status_code=exc.status, media_type="application/json", headers=headers)


def _field(err: dict) -> list[str]:
    return [str(p) for p in err.get("loc", ()) if p != "body" and not _TYPE_TAG.match(str(p))]


def from_validation(errors: list[dict]) -> APIError:
    """A pydantic error as a 400 naming its field (dotted, list indices included). Of a union's errors, the one
    that got deepest and is about the value, not its type, says most ("lone surrogate" over "not a string")."""
    if errors[0].get("type") == "json_invalid":
        err = errors[0]
        return APIError(400, f"malformed JSON body: {err.get('ctx', {}).get('error') or err.get('msg')}")
    first = _field(errors[0])[:1]
    same_field = [e for e in errors if _field(e)[:1] == first]
    err = min(same_field, key=lambda e: (-len(_field(e)), str(e.get("type", "")).endswith(("_type", "_parsing"))))
    param = ".".join(_field(err)) or None
    return APIError(400, f"{param or 'body'}: {err.get('msg')}", param)


def install_error_handlers(app: FastAPI) -> None:
    """Our refusals, FastAPI's validation, Starlette's 404/405 and anything unexpected, all in one shape."""
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def request_validation(_: Request, exc: RequestValidationError) -> Response:
        return error_response(from_validation(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        messages = {404: f"no route {request.url.path!r}", 405: f"method {request.method} is not allowed here"}
        message = messages.get(exc.status_code, str(exc.detail))
        return error_response(APIError(exc.status_code, message), headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error answering %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(APIError(500, "internal server error", kind="server_error"))
