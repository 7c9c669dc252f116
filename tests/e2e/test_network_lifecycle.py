"""Networking through lifecycle edges, against a running daemon: a host namespace that does not
exist yet, reads while VMs change state, and a simulated host reboot (VMMs killed, every
namespace deleted while the daemon is down)."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from metald.network import names
from tests.conftest import serving
from tests.support.daemon import Daemon, kill_leftovers
from tests.support.rpc import Rpc

pytestmark = [pytest.mark.e2e]

NIC = {"network": [{"interface_id": "eth0"}]}


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


@pytest.fixture(scope="module")
def lifed(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Iterator[Daemon]:
    with serving(Daemon(tmp_path_factory.mktemp("metald-life"), assets_dir, name="lif")) as daemon:
        yield daemon


def test_delete_of_a_never_booted_vm_before_the_host_namespace_exists(lifed: Daemon, customer: str) -> None:
    rpc = Rpc(lifed.url, customer)
    assert not netns_exists(lifed.host_netns)  # no VM with a NIC has booted on this daemon yet
    vm_id = rpc.create(NIC)
    rpc.ok("DeleteVm", {"vm_id": vm_id})
    status, body = rpc.error("GetVmInfo", {"vm_id": vm_id})
    assert status == 404 and body["code"] == "not_found"
    assert not rpc.ok("ListVms", {}).get("vms")


def test_get_vm_info_never_fails_while_a_vm_changes_state(lifed: Daemon, customer: str) -> None:
    rpc = Rpc(lifed.url, customer)
    vm_id = rpc.create(NIC)
    rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True})
    failures: list[str] = []
    reads = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal reads
        reader = Rpc(lifed.url, customer)
        while not stop.is_set():
            resp = reader.call("GetVmInfo", {"vm_id": vm_id})
            reads += 1
            if resp.status_code != 200:
                failures.append(f"{resp.status_code} {resp.text}")

    pollers = [threading.Thread(target=poll) for _ in range(3)]
    for thread in pollers:
        thread.start()
    try:
        for _ in range(2):
            rpc.ok("RebootVm", {"vm_id": vm_id, "force": True})
            rpc.ok("ShutdownVm", {"vm_id": vm_id, "force": True})  # the VM's namespace goes away
            rpc.ok("BootVm", {"vm_id": vm_id})
        rpc.ok("ShutdownVm", {"vm_id": vm_id, "force": True})
    finally:
        stop.set()
        for thread in pollers:
            thread.join()
    assert not failures, failures[:3]
    assert reads > 20
    info = rpc.info(vm_id)
    assert info["state"] == "VM_STATE_SHUTDOWN" and not info.get("network_info", {}).get("interfaces")


def test_after_a_host_reboot_delete_and_boot_work(lifed: Daemon, customer: str) -> None:
    rpc = Rpc(lifed.url, customer)
    doomed, again = rpc.create(NIC), rpc.create(NIC)
    for vm_id in (doomed, again):
        rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True})
    # The host reboots while the daemon is down: VMMs, VM namespaces and the host namespace are gone.
    lifed.kill9()
    kill_leftovers(lifed.data_dir)
    for ns in (names.vm_netns(doomed), names.vm_netns(again), lifed.host_netns):
        subprocess.run(["ip", "netns", "del", ns], check=True)
    lifed.start()
    for vm_id in (doomed, again):
        assert rpc.state(vm_id) == "VM_STATE_SHUTDOWN"
    rpc.ok("DeleteVm", {"vm_id": doomed, "force": True})
    status, _ = rpc.error("GetVmInfo", {"vm_id": doomed})
    assert status == 404
    rpc.ok("BootVm", {"vm_id": again, "wait_for_ready": True})  # its network is rebuilt
    nic = rpc.info(again)["network_info"]["interfaces"][0]
    assert netns_exists(names.vm_netns(again)) and netns_exists(lifed.host_netns)
    assert nic["tap_device"] == names.tap_device(again, 0)
    rpc.ok("DeleteVm", {"vm_id": again, "force": True})
    assert not netns_exists(names.vm_netns(again))
