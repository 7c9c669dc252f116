"""Host reboot: the daemon is down while every VMM dies and every namespace (the VMs' and the
daemon's host namespace), TAP, veth and cgroup disappears, as after a reboot. On restart:

- every VM whose VMM is gone is SHUTDOWN with a reason, and the log never says "recovery of … failed";
- BootVm works again, its network rebuilt (same MAC and addresses);
- DeleteVm works for each, forced or not, booted or never booted (with a NIC);
- nothing of the VMs is left on the host afterwards.
"""

from __future__ import annotations

import pytest

from tests.reliability.common import wait_for
from tests.reliability.conftest import MakeDaemon
from tests.reliability.host import (
    Footprint,
    cgroups_of,
    daemon_namespaces,
    kill_processes,
    remove_cgroups,
    remove_namespaces,
)
from tests.support.rpc import Rpc

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

NIC = {"network": [{"interface_id": "eth0"}]}


def test_host_reboot(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon(name="rel-rbt")
    rpc = Rpc(daemon.url, "reboot")
    running = rpc.create(NIC, vm_id="rel-rbt-running")
    paused = rpc.create(NIC, vm_id="rel-rbt-paused")
    plain = rpc.create({}, vm_id="rel-rbt-plain")
    never = rpc.create(NIC, vm_id="rel-rbt-never")
    vm_ids = [running, paused, plain, never]
    for vm_id in (running, paused, plain):
        rpc.ok("BootVm", {"vm_id": vm_id})
    rpc.ok("PauseVm", {"vm_id": paused})
    nic_before = rpc.info(running)["network_info"]["interfaces"][0]
    before = Footprint.of(daemon, vm_ids)
    assert len(before.qemus) == 3 and len(before.namespaces) == 2, before  # positive control

    # The "reboot": daemon down, then everything a reboot takes away.
    daemon.kill9()
    kill_processes(daemon.data_dir)
    remove_namespaces(daemon_namespaces(daemon.host_netns, vm_ids) | {daemon.host_netns})
    remove_cgroups(cgroups_of(vm_ids, daemon.data_dir / "vms"))
    gone = Footprint.of(daemon, vm_ids)
    assert not gone.qemus and not gone.namespaces and not gone.host_links, gone
    log_start = len(daemon.logs())
    daemon.start()

    for vm_id in (running, paused, plain):
        info = rpc.info(vm_id)
        assert info["state"] == "VM_STATE_SHUTDOWN", info
        assert info["backend_info"].get("shutdown_reason"), info["backend_info"]
    assert rpc.state(never) == "VM_STATE_CREATED"
    recovery = [line for line in daemon.logs()[log_start:].splitlines() if "recovery of" in line]
    assert len(recovery) == 3, recovery  # one decision logged per VM that ran (positive control)
    failures = [line for line in recovery if "failed" in line]
    assert not failures, failures

    booted = rpc.ok("BootVm", {"vm_id": running, "wait_for_ready": True, "wait_timeout_seconds": 60})
    assert booted["state"] == "VM_STATE_RUNNING"
    nic_after = rpc.info(running)["network_info"]["interfaces"][0]
    assert {k: nic_after[k] for k in ("guest_mac", "guest_ipv4")} == {
        k: nic_before[k] for k in ("guest_mac", "guest_ipv4")
    }

    rpc.ok("DeleteVm", {"vm_id": running, "force": True})
    rpc.ok("DeleteVm", {"vm_id": paused, "force": False})
    rpc.ok("DeleteVm", {"vm_id": plain, "force": True})
    rpc.ok("DeleteVm", {"vm_id": never, "force": False})
    assert rpc.ok("ListVms", {}).get("vms", []) == []

    def clean() -> Footprint | None:
        fp = Footprint.of(daemon, vm_ids)
        held = (fp.qemus, fp.supervisors, fp.vm_dirs, fp.namespaces, fp.taps, fp.cgroups, fp.root_links)
        return None if any(held) or any(link.startswith("vh_") for link in fp.host_links) else fp

    wait_for(clean, 10, "nothing of the VMs left on the host")
