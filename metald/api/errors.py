"""The one place where domain errors become Connect/gRPC errors (with google.rpc.ErrorInfo)."""

from __future__ import annotations

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from metald.domain.errors import ERROR_DOMAIN, ErrorCode, MetaldError
from metald.gen.google.rpc.error_details_pb import ErrorInfo

_CODES: dict[ErrorCode, Code] = {
    ErrorCode.INVALID_ARGUMENT: Code.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: Code.NOT_FOUND,
    ErrorCode.ALREADY_EXISTS: Code.ALREADY_EXISTS,
    ErrorCode.PERMISSION_DENIED: Code.PERMISSION_DENIED,
    ErrorCode.RESOURCE_EXHAUSTED: Code.RESOURCE_EXHAUSTED,
    ErrorCode.FAILED_PRECONDITION: Code.FAILED_PRECONDITION,
    ErrorCode.DEADLINE_EXCEEDED: Code.DEADLINE_EXCEEDED,
    ErrorCode.UNAVAILABLE: Code.UNAVAILABLE,
    ErrorCode.INTERNAL: Code.INTERNAL,
    ErrorCode.UNAUTHENTICATED: Code.UNAUTHENTICATED,
    ErrorCode.OUT_OF_RANGE: Code.OUT_OF_RANGE,
    ErrorCode.UNIMPLEMENTED: Code.UNIMPLEMENTED,
}


def to_connect_error(error: MetaldError) -> ConnectError:
    details = []
    if error.reason:
        details.append(ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata))
    return ConnectError(_CODES[error.code], error.message, details)
