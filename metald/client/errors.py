"""Errors the SDK raises: one class per code, each carrying the code, the message and the
server's google.rpc.ErrorInfo (reason, domain, metadata) when it sent one."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from metald.gen.google.rpc.error_details_pb import ErrorInfo

# gRPC's numeric codes follow the order of Connect's Code enum (canceled = 1 ... unauthenticated = 16).
GRPC_NUMBERS: dict[Code, int] = {code: number for number, code in enumerate(Code, start=1)}
_ERROR_INFO = "google.rpc.ErrorInfo"


class ApiError(Exception):
    """A failed call. `code` is the Connect code (e.g. Code.NOT_FOUND, str(code) "not_found")."""

    def __init__(self, code: Code, message: str, info: ErrorInfo | None = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.reason = info.reason if info else ""
        self.domain = info.domain if info else ""
        self.metadata: dict[str, str] = dict(info.metadata) if info else {}

    @property
    def grpc_code(self) -> int:
        return GRPC_NUMBERS[self.code]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.reason:
            out["error_info"] = {"reason": self.reason, "domain": self.domain, "metadata": self.metadata}
        return out


class InvalidArgumentError(ApiError): ...


class NotFoundError(ApiError): ...


class AlreadyExistsError(ApiError): ...


class PermissionDeniedError(ApiError): ...


class ResourceExhaustedError(ApiError): ...


class FailedPreconditionError(ApiError): ...


class UnauthenticatedError(ApiError): ...


class DeadlineExceededError(ApiError): ...


class UnavailableError(ApiError): ...


class InternalError(ApiError): ...


_CLASSES: dict[Code, type[ApiError]] = {
    Code.INVALID_ARGUMENT: InvalidArgumentError,
    Code.NOT_FOUND: NotFoundError,
    Code.ALREADY_EXISTS: AlreadyExistsError,
    Code.PERMISSION_DENIED: PermissionDeniedError,
    Code.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    Code.FAILED_PRECONDITION: FailedPreconditionError,
    Code.UNAUTHENTICATED: UnauthenticatedError,
    Code.DEADLINE_EXCEEDED: DeadlineExceededError,
    Code.UNAVAILABLE: UnavailableError,
    Code.INTERNAL: InternalError,
}


def api_error(code: Code, message: str, info: ErrorInfo | None = None) -> ApiError:
    return _CLASSES.get(code, ApiError)(code, message, info)


def from_connect(error: ConnectError) -> ApiError:
    info = next(
        (d.value(ErrorInfo) for d in error.details if d.type_name == _ERROR_INFO),
        None,
    )
    return api_error(error.code, error.message, info)


def from_http(status: int, body: bytes) -> ApiError:
    """From a REST response's Connect error body (the console and health endpoints)."""
    try:
        data = json.loads(body)
        code = Code(data["code"])
    except (ValueError, KeyError, TypeError):
        return api_error(Code.UNKNOWN, f"HTTP {status}: {body[:200]!r}")
    info = None
    for detail in data.get("details") or []:
        if isinstance(detail, Mapping) and detail.get("type") == _ERROR_INFO:
            raw = str(detail.get("value", ""))
            info = ErrorInfo.from_binary(base64.b64decode(raw + "=" * (-len(raw) % 4)))
    return api_error(code, str(data.get("message", "")), info)
