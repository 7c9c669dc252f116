"""The state machine over real guests: every allowed transition works, every other one is
FAILED_PRECONDITION naming the current state, and one VM's operations are serialised."""

from __future__ import annotations

import concurrent.futures

import pytest

from tests.support.rpc import Rpc

pytestmark = pytest.mark.e2e

NOT_FROM_CREATED = [("PauseVm", {}), ("ResumeVm", {}), ("RebootVm", {}), ("ShutdownVm", {})]
NOT_FROM_RUNNING = [("BootVm", {}), ("ResumeVm", {}), ("DeleteVm", {})]
NOT_FROM_PAUSED = [("BootVm", {}), ("PauseVm", {}), ("RebootVm", {}), ("DeleteVm", {})]
NOT_FROM_SHUTDOWN = [("PauseVm", {}), ("ResumeVm", {}), ("RebootVm", {}), ("ShutdownVm", {})]


def _refused(rpc: Rpc, vm_id: str, cases: list[tuple[str, dict]], state: str) -> None:
    for method, extra in cases:
        status, body = rpc.error(method, {"vm_id": vm_id, **extra})
        assert status == 412, (method, body)
        assert body["code"] == "failed_precondition"
        assert state in body["message"], body["message"]
        assert body["details"][0]["debug"]["metadata"]["current_state"] == state
    assert rpc.state(vm_id) == state


def test_every_transition_and_guard(rpc: Rpc) -> None:
    vm_id = rpc.create()
    _refused(rpc, vm_id, NOT_FROM_CREATED, "VM_STATE_CREATED")

    assert rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True}) == {
        "success": True,
        "state": "VM_STATE_RUNNING",
    }
    _refused(rpc, vm_id, NOT_FROM_RUNNING, "VM_STATE_RUNNING")
    info = rpc.info(vm_id)
    assert info["backend_info"]["backend_type"] == "qemu"
    assert int(info["backend_info"]["process_id"]) > 0
    assert info["backend_info"]["guest_ready"] == "true"

    assert rpc.ok("PauseVm", {"vm_id": vm_id}) == {"success": True, "state": "VM_STATE_PAUSED"}
    _refused(rpc, vm_id, NOT_FROM_PAUSED, "VM_STATE_PAUSED")
    assert rpc.ok("ResumeVm", {"vm_id": vm_id})["state"] == "VM_STATE_RUNNING"
    assert rpc.ok("RebootVm", {"vm_id": vm_id, "force": True})["state"] == "VM_STATE_RUNNING"

    # PAUSED -> SHUTDOWN is allowed too
    rpc.ok("PauseVm", {"vm_id": vm_id})
    assert rpc.ok("ShutdownVm", {"vm_id": vm_id, "force": True}) == {
        "success": True,
        "state": "VM_STATE_SHUTDOWN",
    }
    _refused(rpc, vm_id, NOT_FROM_SHUTDOWN, "VM_STATE_SHUTDOWN")

    # a stopped VM starts again
    assert rpc.ok("BootVm", {"vm_id": vm_id})["state"] == "VM_STATE_RUNNING"
    status, body = rpc.error("DeleteVm", {"vm_id": vm_id})
    assert status == 412 and "force" in body["message"]
    assert rpc.ok("DeleteVm", {"vm_id": vm_id, "force": True}) == {"success": True}
    status, _ = rpc.error("GetVmInfo", {"vm_id": vm_id})
    assert status == 404


def test_concurrent_boots_boot_once(rpc: Rpc) -> None:
    vm_id = rpc.create()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: rpc.call("BootVm", {"vm_id": vm_id}), range(4)))
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 412, 412, 412], [r.text for r in results]
    pid = rpc.info(vm_id)["backend_info"]["process_id"]
    assert rpc.info(vm_id)["backend_info"]["process_id"] == pid
    rpc.ok("DeleteVm", {"vm_id": vm_id, "force": True})


def test_shutdown_timeout_negative_is_invalid(rpc: Rpc) -> None:
    vm_id = rpc.create()
    rpc.ok("BootVm", {"vm_id": vm_id})
    status, body = rpc.error("ShutdownVm", {"vm_id": vm_id, "timeout_seconds": -1})
    assert status == 400 and body["message"].startswith("timeout_seconds")
    rpc.ok("DeleteVm", {"vm_id": vm_id, "force": True})
