"""Errors as values with codes: the domain's only way to say no. The API layer maps them once."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Protocol

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

    def extended(self, more: str) -> MetaldError:
        """The same refusal with `more` (e.g. the end of a VMM's log) appended to its message."""
        return MetaldError(self.code, f"{self.message}{more}", reason=self.reason, metadata=self.metadata)


def refusal(code: ErrorCode, reason: str, message: str, /, **metadata: str) -> MetaldError:
    """A MetaldError spelled once: its code, its ErrorInfo reason, a message, metadata as keywords."""
    return MetaldError(code, message, reason=reason, metadata=metadata)


class Refusal(Protocol):
    """A factory of MetaldErrors of one code: `precondition("VMM_NOT_RUNNING", message, vm_id=...)`."""

    def __call__(self, reason: str, message: str, /, **metadata: str) -> MetaldError: ...


def _of_code(code: ErrorCode) -> Refusal:
    def make(reason: str, message: str, /, **metadata: str) -> MetaldError:
        return refusal(code, reason, message, **metadata)

    return make


precondition = _of_code(ErrorCode.FAILED_PRECONDITION)
exhausted = _of_code(ErrorCode.RESOURCE_EXHAUSTED)
unavailable = _of_code(ErrorCode.UNAVAILABLE)
internal = _of_code(ErrorCode.INTERNAL)
conflict = _of_code(ErrorCode.ALREADY_EXISTS)
denied = _of_code(ErrorCode.PERMISSION_DENIED)


# ---- the refusals more than one part of metald gives ----


def invalid(field: str, problem: str) -> MetaldError:
    """INVALID_ARGUMENT naming the offending field."""
    return refusal(ErrorCode.INVALID_ARGUMENT, "INVALID_FIELD", f"{field}: {problem}", field=field)


def not_owned(vm_id: str, customer_id: str) -> MetaldError:
    message = f"VM {vm_id} not found or not owned by customer"
    return denied("VM_NOT_OWNED", message, vm_id=vm_id, customer_id=customer_id)


def not_found(vm_id: str) -> MetaldError:
    return refusal(ErrorCode.NOT_FOUND, "VM_NOT_FOUND", f"VM {vm_id} not found", vm_id=vm_id)


def snapshot_not_found(snapshot_id: str) -> MetaldError:
    message = f"snapshot {snapshot_id} not found"
    return refusal(ErrorCode.NOT_FOUND, "SNAPSHOT_NOT_FOUND", message, snapshot_id=snapshot_id)


def snapshot_not_owned(snapshot_id: str) -> MetaldError:
    message = f"snapshot {snapshot_id} belongs to another customer"
    return denied("SNAPSHOT_NOT_OWNED", message, snapshot_id=snapshot_id)


def vm_exists(vm_id: str) -> MetaldError:
    return conflict("VM_EXISTS", f"VM {vm_id} already exists", vm_id=vm_id)


def customer_mismatch(customer_id: str) -> MetaldError:
    """A request's customer_id that is not the caller's own."""
    message = "customer_id does not match the authenticated customer"
    return denied("CUSTOMER_MISMATCH", message, customer_id=customer_id)


def vm_exited(vm_id: str, reason: str) -> MetaldError:
    """The VMM ended while a caller waited for its guest to be ready."""
    message = f"VM {vm_id} exited before its guest was ready ({reason or 'unknown'})"
    return precondition("VM_EXITED", message, vm_id=vm_id, exit_reason=reason)


def unimplemented(rpc: str, where: str = "on this host") -> MetaldError:
    return refusal(ErrorCode.UNIMPLEMENTED, "UNIMPLEMENTED", f"{rpc} is not available {where} yet")


def disk_full(message: str, /, **metadata: str) -> MetaldError:
    """The host's disk has no room for what an operation writes."""
    return exhausted("DISK_FULL", message, **metadata)


def kernel_invalid(
    field: str, message: str, /, code: ErrorCode = ErrorCode.INVALID_ARGUMENT, **metadata: str
) -> MetaldError:
    """A kernel image that cannot boot: INVALID_ARGUMENT for a request's input, FAILED_PRECONDITION
    for a stored VM's (found out at boot)."""
    return refusal(code, "KERNEL_INVALID", message, field=field, **metadata)


def snapshot_unsupported(vm_id: str, message: str) -> MetaldError:
    """This VM, as it runs, cannot be snapshotted (the backend or the way it was started)."""
    return precondition("SNAPSHOT_UNSUPPORTED", message, vm_id=vm_id)


def snapshot_invalid(message: str, /, **metadata: str) -> MetaldError:
    """A snapshot's files that cannot be restored from."""
    return precondition("SNAPSHOT_INVALID", message, **metadata)
