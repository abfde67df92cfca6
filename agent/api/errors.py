"""Every 4xx and 5xx leaves the server shaped as OpenAI's clients expect:
`{"error": {"message", "type", "param", "code"}}`; an unexpected failure is logged, never leaked."""

from __future__ import annotations

import logging
from typing import TypeVar

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import ResponseSpec

from ds4.agent.errors import AgentError

log = logging.getLogger("ds4.api")
T = TypeVar("T")

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


def responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI declarations of the error responses a route can give."""
    words = {
        400: "malformed request",
        401: "missing or wrong API key",
        403: "refused: a path outside the roots, or a setting the server does not allow",
        409: "not ready (e.g. not indexed yet)",
        404: "no such model or route",
        413: "request body too large",
        415: "the body is not JSON (Content-Type: application/json)",
        429: "rate limit, or the fix-job queue is full",
        500: "server error",
        502: "the upstream endpoint failed (serve --endpoint)",
        503: "the engine is not running (the server is stopping)",
        504: "the upstream endpoint timed out (serve --endpoint)",
    }
    return {s: ResponseSpec(data_container=ErrorBody, description=words[s]) for s in statuses}


class APIError(AgentError):
    """A request refused with an HTTP status and an OpenAI-shaped body; `param` names the field at fault."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


async def strict_body(request: Request, kind: type[T]) -> T:
    """The request's JSON body decoded against `kind` with JSON Schema's rules, as published: litestar's
    own decoding is lax (it takes `"1"` for 1 and `0` for false), msgspec's strict mode is stricter than
    the schema (it refuses 1.0 as an integer, which JSON Schema allows)."""
    try:
        raw = msgspec.json.decode(await request.body())
        return msgspec.convert(_integral(raw), type=kind, strict=True)
    except msgspec.ValidationError as e:
        message = str(e)
        at = message.rpartition(" - at `$.")
        param = at[2].rstrip("`") if at[1] else None  # the full path, as in messages[0].content
        raise APIError(400, message, param or None, "invalid_value") from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None


def _integral(value):
    """JSON numbers with no fractional part as ints (JSON Schema's "integer" includes 1.0)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _response(status: int, message: str, param=None, code=None, headers=None) -> Response:
    return Response(error_body(status, message, param, code), status_code=status, headers=headers)


def handle_api_error(_: Request, e: APIError) -> Response:
    return _response(e.status, e.message, e.param, e.code, e.headers)


def handle_validation(_: Request, e: ValidationException) -> Response:
    extra = e.extra if isinstance(e.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    key = first.get("key")
    message = first.get("message") or str(e.detail)
    param = key if isinstance(key, str) and key else None
    detail = f"{param}: {message}" if param else f"{e.detail}: {message}" if message != e.detail else e.detail
    return _response(400, detail, param, "invalid_value")


def handle_http(_: Request, e: HTTPException) -> Response:
    status = e.status_code
    message = {
        404: "no such route: see /schema/openapi.json",
        405: "method not allowed on this route",
        413: "request body too large",
    }.get(status, str(e.detail))
    return _response(status, message, headers=getattr(e, "headers", None))


def handle_unexpected(request: Request, e: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return _response(500, "internal server error (details are in the server's log)")


HANDLERS = {
    APIError: handle_api_error,
    ValidationException: handle_validation,
    HTTPException: handle_http,
    Exception: handle_unexpected,
}
