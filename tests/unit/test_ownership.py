"""Whose a VM is (metald/domain/ownership.py), as the service, guest work and the gateway ask it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.model import Vm, VmConfig
from metald.domain.ownership import owned, owned_vm
from metald.domain.pending import PendingOp
from metald.domain.states import VmState, check_state_filter

NOW = datetime.now(UTC)
VM = Vm("vm1", "alice", VmConfig(), VmState.CREATED, NOW, NOW)


def test_the_owner_gets_the_vm() -> None:
    assert owned_vm(VM, "vm1", "alice") is VM
    assert owned(VM, "vm1", "alice") is VM


@pytest.mark.parametrize(
    ("vm", "customer", "code", "reason"),
    [
        (None, "alice", ErrorCode.NOT_FOUND, "VM_NOT_FOUND"),
        (VM, "bob", ErrorCode.PERMISSION_DENIED, "VM_NOT_OWNED"),
        (
            Vm("vm1", "alice", VmConfig(), VmState.CREATED, NOW, NOW, pending=PendingOp.CREATING),
            "alice",
            ErrorCode.NOT_FOUND,
            "VM_NOT_FOUND",
        ),
    ],
)
def test_no_vm_another_customers_or_a_half_created_one(
    vm: Vm | None, customer: str, code: ErrorCode, reason: str
) -> None:
    with pytest.raises(MetaldError) as caught:
        owned_vm(vm, "vm1", customer)
    assert (caught.value.code, caught.value.reason) == (code, reason)
    assert caught.value.metadata["vm_id"] == "vm1"


def test_a_state_filter_may_not_name_unspecified() -> None:
    check_state_filter([VmState.RUNNING])
    with pytest.raises(MetaldError) as caught:
        check_state_filter([VmState.RUNNING, VmState.UNSPECIFIED])
    assert caught.value.metadata["field"] == "state_filter"
