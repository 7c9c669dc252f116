"""Errors as values with codes: the domain's only way to say no. The API layer maps them once."""

from __future__ import annotations

import enum
from collections.abc import Mapping

ERROR_DOMAIN = "metald.unkey.com"


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    UNAUTHENTICATED = "unauthenticated"
    OUT_OF_RANGE = "out_of_range"
    UNIMPLEMENTED = "unimplemented"


class MetaldError(Exception):
    """A failure with a code, a human message and an optional machine-readable reason."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


def invalid(field: str, problem: str) -> MetaldError:
    """INVALID_ARGUMENT naming the offending field."""
    return MetaldError(
        ErrorCode.INVALID_ARGUMENT,
        f"{field}: {problem}",
        reason="INVALID_FIELD",
        metadata={"field": field},
    )


def not_owned(vm_id: str, customer_id: str) -> MetaldError:
    return MetaldError(
        ErrorCode.PERMISSION_DENIED,
        f"VM {vm_id} not found or not owned by customer",
        reason="VM_NOT_OWNED",
        metadata={"vm_id": vm_id, "customer_id": customer_id},
    )


def not_found(vm_id: str) -> MetaldError:
    return MetaldError(
        ErrorCode.NOT_FOUND, f"VM {vm_id} not found", reason="VM_NOT_FOUND", metadata={"vm_id": vm_id}
    )
