"""Issue 11, service side, against running daemons:

- DeleteVm of a never-booted VM with a NIC works on a daemon whose host namespace does not exist yet,
  and a CreateVm refused during network planning leaves no ghost id;
- GetVmInfo never fails while the VM changes state;
- a forced ShutdownVm or DeleteVm pre-empts a graceful ShutdownVm waiting on a guest that ignores
  ACPI; the graceful timeout is bounded; a negative wait_timeout_seconds is refused before booting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.test_guest_lifecycle import guest_exec
from tests.conftest import serving
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

pytestmark = pytest.mark.e2e

NIC = {"network": [{"interface_id": "eth0"}]}


@pytest.fixture
def fresh_daemon(tmp_path: Path, assets_dir: Path) -> Iterator[Daemon]:
    """A daemon that has never attached a NIC: its host namespace does not exist yet."""
    with serving(
        Daemon(tmp_path / "state", assets_dir, "--max-vms-per-customer", "1", name="fresh-svc")
    ) as d:
        yield d


def test_delete_and_refused_create_without_a_host_namespace(fresh_daemon: Daemon) -> None:
    rpc = Rpc(fresh_daemon.url, "fresh")
    huge = {"bandwidth_bytes_per_second": 2**40, "refill_time_millis": 100000}
    status, body = rpc.error(
        "CreateVm",
        {"vm_id": "ghost", "config": {"network": [{"interface_id": "eth0", "rate_limit": huge}]}},
    )
    assert status == 400 and body["code"] == "invalid_argument", body
    status, body = rpc.error("GetVmInfo", {"vm_id": "ghost"})
    assert status == 404, body
    vm_id = rpc.create(NIC, vm_id="ghost")  # neither ALREADY_EXISTS nor over the quota of one
    rpc.ok("DeleteVm", {"vm_id": vm_id})  # never booted: no namespace was ever made
    status, body = rpc.error("GetVmInfo", {"vm_id": vm_id})
    assert status == 404, body
    assert rpc.ok("ListVms", {}).get("vms", []) == []
    rpc.create(NIC, vm_id="again")  # the quota is free again


def test_info_never_fails_during_state_changes(rpc: Rpc) -> None:
    vm_id = rpc.create(NIC)
    rpc.ok("BootVm", {"vm_id": vm_id})
    errors: list[str] = []
    done = threading.Event()

    def read() -> None:
        reader = Rpc(rpc.url, rpc.customer)
        while not done.is_set():
            resp = reader.call("GetVmInfo", {"vm_id": vm_id})
            if resp.status_code != 200:
                errors.append(f"{resp.status_code} {resp.text[:200]}")

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for _ in range(3):
            rpc.ok("PauseVm", {"vm_id": vm_id})
            rpc.ok("ResumeVm", {"vm_id": vm_id})
            rpc.ok("RebootVm", {"vm_id": vm_id, "force": True})
            rpc.ok("ShutdownVm", {"vm_id": vm_id, "force": True})
            rpc.ok("BootVm", {"vm_id": vm_id})
    finally:
        done.set()
        for t in readers:
            t.join(30)
    assert not errors, errors[:5]


@pytest.mark.parametrize("forced", ["ShutdownVm", "DeleteVm"])
def test_a_forced_stop_preempts_a_graceful_one(daemon: Daemon, rpc: Rpc, forced: str) -> None:
    vm_id = rpc.create()
    rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True})
    code, _ = guest_exec(daemon.data_dir / "vms" / vm_id, "killall acpid")  # the guest ignores ACPI now
    assert code == 0
    graceful: dict[str, httpx.Response] = {}

    def stop_gracefully() -> None:
        client = Rpc(rpc.url, rpc.customer)
        graceful["answer"] = client.call("ShutdownVm", {"vm_id": vm_id, "timeout_seconds": 600})

    waiter = threading.Thread(target=stop_gracefully)
    waiter.start()
    time.sleep(1.5)  # the power button is pressed and ignored
    assert waiter.is_alive()
    started = time.monotonic()
    other = Rpc(rpc.url, rpc.customer)
    other.ok(forced, {"vm_id": vm_id, "force": True})
    took = time.monotonic() - started
    waiter.join(30)
    assert not waiter.is_alive(), "the graceful ShutdownVm never answered"
    assert took < 15, f"{forced}(force) waited {took:.1f}s behind the graceful shutdown"
    assert graceful["answer"].status_code == 200, graceful["answer"].text
    if forced == "ShutdownVm":
        info = rpc.info(vm_id)
        assert info["state"] == "VM_STATE_SHUTDOWN" and "process_id" not in info["backend_info"], info


def test_timeouts_are_bounded_and_checked_first(rpc: Rpc) -> None:
    vm_id = rpc.create()
    status, body = rpc.error("BootVm", {"vm_id": vm_id, "wait_for_ready": True, "wait_timeout_seconds": -5})
    assert status == 400 and "wait_timeout_seconds" in body["message"], body
    assert rpc.state(vm_id) == "VM_STATE_CREATED"  # refused before booting
    rpc.ok("BootVm", {"vm_id": vm_id})
    status, body = rpc.error("ShutdownVm", {"vm_id": vm_id, "timeout_seconds": 2**31 - 1})
    assert status == 400 and "timeout_seconds" in body["message"], body
    assert rpc.state(vm_id) == "VM_STATE_RUNNING"
