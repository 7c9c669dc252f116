"""Customers never see or touch each other's VMs; unknown VMs are NOT_FOUND."""

from __future__ import annotations

import pytest

from tests.support.rpc import Rpc

BY_ID = [
    ("BootVm", {}),
    ("ShutdownVm", {"force": True}),
    ("PauseVm", {}),
    ("ResumeVm", {}),
    ("RebootVm", {}),
    ("DeleteVm", {"force": True}),
    ("GetVmInfo", {}),
]


@pytest.mark.parametrize(("method", "extra"), BY_ID)
def test_by_id_rpc_on_foreign_vm_is_permission_denied(
    rpc: Rpc, customer: str, method: str, extra: dict
) -> None:
    vm_id = rpc.create()
    intruder = "intruder-" + customer
    status, body = rpc.error(method, {"vm_id": vm_id, **extra}, customer=intruder)
    assert status == 403
    assert body["code"] == "permission_denied"
    assert body["message"] == f"VM {vm_id} not found or not owned by customer"
    info = body["details"][0]
    assert info["type"] == "google.rpc.ErrorInfo"
    assert info["debug"] == {
        "reason": "VM_NOT_OWNED",
        "domain": "metald.unkey.com",
        "metadata": {"vm_id": vm_id, "customer_id": intruder},
    }
    assert rpc.state(vm_id) == "VM_STATE_CREATED", "the owner's VM is untouched"


@pytest.mark.parametrize(("method", "extra"), BY_ID)
def test_unknown_vm_is_not_found(rpc: Rpc, method: str, extra: dict) -> None:
    status, body = rpc.error(method, {"vm_id": "vm_doesnotexist", **extra})
    assert status == 404 and body["code"] == "not_found"


def test_list_shows_and_counts_only_own_vms(rpc: Rpc, customer: str) -> None:
    mine = {rpc.create() for _ in range(3)}
    other = Rpc(rpc.url, "other-" + customer)
    try:
        theirs = {other.create() for _ in range(2)}
        page = rpc.ok("ListVms", {})
        assert {v["vm_id"] for v in page["vms"]} == mine
        assert page["total_count"] == 3
        page = other.ok("ListVms", {})
        assert {v["vm_id"] for v in page["vms"]} == theirs
        assert page["total_count"] == 2
    finally:
        other.delete_all()


def test_customer_id_in_request_must_match_token(rpc: Rpc, customer: str) -> None:
    status, body = rpc.error("CreateVm", {"config": {}, "customer_id": "someone-else"})
    assert status == 403 and body["code"] == "permission_denied"
    vm_id = rpc.ok("CreateVm", {"config": {}, "customer_id": customer})["vm_id"]
    assert rpc.state(vm_id) == "VM_STATE_CREATED"
