"""VMM crash: a VM whose QEMU dies becomes SHUTDOWN by itself, within seconds, with the exit logged
and counted and its network namespace, TAP and veth removed; BootVm then starts it again.

Two crashes of one VM with a NIC: SIGKILL to QEMU while RUNNING, then SIGKILL to its supervisor
while PAUSED (QEMU follows it through its parent-death signal). Between the kill and SHUTDOWN the
test makes no RPC: it watches only GET /metrics (a scrape, not an RPC) and the host.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from tests.reliability.common import wait_for
from tests.reliability.conftest import MakeDaemon
from tests.reliability.host import Footprint, metric, supervisor_pids
from tests.support.rpc import Rpc

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

NIC = {"network": [{"interface_id": "eth0"}]}
SHUTDOWN_WITHIN = 10.0  # seconds from the kill to SHUTDOWN in the store (event-driven: 0.1-0.5 s here)


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def crash_logs(logs: str, vm_id: str) -> list[dict[str, str]]:
    """The daemon's JSON log records saying this VM's VMM exited unasked."""
    records = []
    for line in logs.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(record, dict)
            and record.get("vm_id") == vm_id
            and "vmm_crashed" in record.get("msg", "")
        ):
            records.append(record)
    return records


def leftovers(fp: Footprint) -> dict[str, set[object]]:
    """What of a stopped VM is still on the host (its directory may stay)."""
    held = {
        "qemus": fp.qemus,
        "supervisors": fp.supervisors,
        "zombies": fp.zombies,
        "sockets": fp.sockets,
        "cgroups": fp.cgroups,
        "namespaces": fp.namespaces,
        "taps": fp.taps,
        "host veths": {link for link in fp.host_links if link.startswith("vh_")},
        "root links": fp.root_links,
    }
    return {k: set(v) for k, v in held.items() if v}


def test_killed_vmm_becomes_shutdown_cleaned_and_boots_again(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon(name="rel-vmm")
    rpc = Rpc(daemon.url, "vmm-crash")
    vm_id = rpc.create(NIC, vm_id="rel-vmm-crashy")
    rpc.ok("BootVm", {"vm_id": vm_id})

    for crash, victim in enumerate(("qemu", "supervisor"), start=1):
        info = rpc.info(vm_id)
        pid = int(info["backend_info"]["process_id"])
        nic = info["network_info"]["interfaces"][0]
        netns = info["network_info"]["namespace"]
        running = Footprint.of(daemon, [vm_id])
        # positive controls: the footprint sees this VM's process, namespace, TAP and veth
        assert running.qemus == {pid} and len(running.supervisors) == 1, running
        assert running.namespaces == {netns} and f"{netns}/{nic['tap_device']}" in running.taps, running
        assert nic["host_device_name"] in running.host_links, running
        exits = metric(scrape(daemon.url), "unkey_metald_vm_exits_total", {"reason": "vmm_crashed"})

        if victim == "supervisor":
            assert rpc.ok("PauseVm", {"vm_id": vm_id})["state"] == "VM_STATE_PAUSED"
            (target,) = supervisor_pids(daemon.data_dir)
        else:
            target = pid
        killed_at = time.monotonic()
        os.kill(target, signal.SIGKILL)

        # No RPC until the store says SHUTDOWN: only the metrics endpoint and the host are watched.
        wait_for(
            lambda: metric(scrape(daemon.url), "unkey_metald_vms", {"state": "VM_STATE_SHUTDOWN"}) == 1,
            SHUTDOWN_WITHIN,
            f"{vm_id} SHUTDOWN after its {victim} was killed",
        )
        took = time.monotonic() - killed_at
        print(f"crash {crash} ({victim} killed): SHUTDOWN after {took:.2f}s")
        text = scrape(daemon.url)
        assert metric(text, "unkey_metald_vm_exits_total", {"reason": "vmm_crashed"}) == exits + 1
        assert metric(text, "unkey_metald_active_vms") == 0

        deadline = time.monotonic() + 5
        while (left := leftovers(Footprint.of(daemon, [vm_id]))) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"not cleaned up 5s after the crash: {left}"
        records = crash_logs(daemon.logs(), vm_id)
        assert len(records) == crash and records[-1]["level"] == "warning", records

        info = rpc.info(vm_id)
        assert info["state"] == "VM_STATE_SHUTDOWN"
        assert info["backend_info"].get("shutdown_reason") == "vmm_crashed", info["backend_info"]
        assert "process_id" not in info["backend_info"] and "network_info" not in info, info

        # the last time, wait for the guest's ready line: the VM really boots again
        booted = rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": victim == "supervisor"})
        assert booted["state"] == "VM_STATE_RUNNING"
        again = rpc.info(vm_id)
        assert int(again["backend_info"]["process_id"]) != pid
        assert again["network_info"]["interfaces"][0]["guest_mac"] == nic["guest_mac"]
        assert again["network_info"]["interfaces"][0]["guest_ipv4"] == nic["guest_ipv4"]

    rpc.ok("DeleteVm", {"vm_id": vm_id, "force": True})
    gone = wait_for(lambda: None if (fp := Footprint.of(daemon, [vm_id])).vm_dirs else fp, 5, "VM dir gone")
    assert not leftovers(gone), leftovers(gone)
