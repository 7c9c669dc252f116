"""Whose a VM is: one answer for the host's service, its guest work and the fleet gateway."""

from __future__ import annotations

from typing import Protocol, TypeVar

from metald.domain.errors import not_found, not_owned
from metald.domain.model import Vm
from metald.domain.pending import PendingOp


class _Owned(Protocol):
    @property
    def customer_id(self) -> str: ...


R = TypeVar("R", bound=_Owned)


def owned(record: R | None, vm_id: str, customer_id: str) -> R:
    """The caller's own record of `vm_id`: NOT_FOUND if there is none, PERMISSION_DENIED if it is
    another customer's."""
    if record is None:
        raise not_found(vm_id)
    if record.customer_id != customer_id:
        raise not_owned(vm_id, customer_id)
    return record


def owned_vm(vm: Vm | None, vm_id: str, customer_id: str) -> Vm:
    """As owned(); a VM still being created is not there yet (or ever)."""
    return owned(None if vm is None or vm.pending == PendingOp.CREATING else vm, vm_id, customer_id)
