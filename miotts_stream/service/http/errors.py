"""The engine's error codes as HTTP sees them: one table for statuses, OpenAI error objects and
WebSocket close codes."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from miotts_stream.service.engine import ErrorCode, SessionError


class CloseCode(enum.IntEnum):
    """WebSocket close codes used here (RFC 6455 section 7.4.1; 1013 from IANA's registry)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007  # a text frame that is not valid UTF-8 (aiohttp sends this itself)
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009  # over --max-receive-message-bytes (aiohttp sends this itself)
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


@dataclass(frozen=True)
class HttpError:
    status: int  # HTTP status of a response that has not started
    error_type: str  # the OpenAI error object's `type`
    close_code: CloseCode  # how a WebSocket stream that ends with this code is closed


# HTTP statuses as in Google's mapping of gRPC codes (google/rpc/code.proto); the OpenAI types
# are those OpenAI's API uses for the same statuses.
HTTP_ERRORS: dict[ErrorCode, HttpError] = {
    ErrorCode.OK: HttpError(200, "", CloseCode.NORMAL),
    ErrorCode.CANCELLED: HttpError(499, "cancelled", CloseCode.NORMAL),
    ErrorCode.INVALID_ARGUMENT: HttpError(400, "invalid_request_error", CloseCode.POLICY_VIOLATION),
    ErrorCode.NOT_FOUND: HttpError(404, "not_found_error", CloseCode.POLICY_VIOLATION),
    ErrorCode.RESOURCE_EXHAUSTED: HttpError(429, "rate_limit_error", CloseCode.TRY_AGAIN_LATER),
    ErrorCode.UNAVAILABLE: HttpError(503, "service_unavailable", CloseCode.TRY_AGAIN_LATER),
    ErrorCode.DEADLINE_EXCEEDED: HttpError(504, "timeout", CloseCode.POLICY_VIOLATION),
    ErrorCode.UNAUTHENTICATED: HttpError(401, "authentication_error", CloseCode.POLICY_VIOLATION),
    ErrorCode.ALREADY_EXISTS: HttpError(409, "conflict_error", CloseCode.POLICY_VIOLATION),
    ErrorCode.FAILED_PRECONDITION: HttpError(
        400, "invalid_request_error", CloseCode.POLICY_VIOLATION
    ),
    ErrorCode.UNIMPLEMENTED: HttpError(501, "not_implemented", CloseCode.POLICY_VIOLATION),
    ErrorCode.INTERNAL: HttpError(500, "server_error", CloseCode.INTERNAL_ERROR),
}


def error_object(err: SessionError) -> dict[str, Any]:
    """OpenAI's error object: `param` is the field the error is about (None when it is not one
    field's), `code` the gRPC status name, as in the WebSocket's errors."""
    return {
        "error": {
            "message": str(err),
            "type": HTTP_ERRORS[err.code].error_type,
            "param": err.field,
            "code": err.code.value,
        }
    }


def error_response(err: SessionError, status: int | None = None) -> web.Response:
    """The error as a JSON response, with the table's status unless `status` says otherwise."""
    return web.json_response(error_object(err), status=status or HTTP_ERRORS[err.code].status)
