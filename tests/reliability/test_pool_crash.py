"""kill -9 of the daemon while a clone boots from the warm pool (issue 13): after the restart no
QEMU or supervisor is orphaned (every live process of the data dir is a VM's or a slot's of the
new daemon), the pool refills, the clone is either running as itself or bootable again, and
deleting everything leaves nothing. With NICs, also no TAP holder namespace of an old slot and,
at the end, no holder or VM namespace at all."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from metald.network import names
from tests.api.test_warm_pool import _holders, _pool_processes, _vm_namespaces, _wait_ready_slots
from tests.reliability.conftest import own_daemon
from tests.support.clones import READY
from tests.support.daemon import Daemon, vmm_pids
from tests.support.rpc import Rpc

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

DELAYS = (0.0, 0.06, 0.15)  # seconds into BootVm: before the take, around the swap and restore, after


def _recorded_pids(daemon: Daemon) -> set[int]:
    """VMM and supervisor pids the VMs' and the slots' state files name."""
    pids: set[int] = set()
    data = daemon.data_dir
    for state in [*data.glob("vms/*/vmm.json"), *data.glob("pool/*/*/vmm.json")]:
        with contextlib.suppress(OSError, ValueError, KeyError):
            recorded = json.loads(state.read_text())
            pids |= {int(recorded["pid"]), int(recorded["supervisor_pid"])}
    return pids


def _boot_quietly(rpc: Rpc, vm_id: str) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the daemon is killed under it
        rpc.call("BootVm", {"vm_id": vm_id, **READY})


@pytest.mark.parametrize("nics", [False, True], ids=["no-nics", "nics"])
def test_kill_9_during_a_pooled_clone_boot(tmp_path: Path, assets_dir: Path, nics: bool) -> None:
    flags = () if nics else ("--no-network-enabled",)
    config = {"network": [{"interface_id": "eth0"}]} if nics else {}
    with own_daemon(tmp_path / "d", assets_dir, *flags, name="poolcrash") as daemon:
        rpc = Rpc(daemon.url, "cpoolcrash")
        source = rpc.create(config)
        rpc.ok("BootVm", {"vm_id": source, **READY})
        snap = rpc.ok("SnapshotVm", {"vm_id": source, "warm_pool_size": 2})["snapshot_id"]
        _wait_ready_slots(daemon, 2)
        clones = []
        for delay in DELAYS:
            clone = rpc.create(config, snapshot_id=snap)
            clones.append(clone)
            boot = threading.Thread(target=_boot_quietly, args=(rpc, clone))
            boot.start()
            time.sleep(delay)
            daemon.kill9()
            boot.join(30)
            daemon.start()
            _wait_ready_slots(daemon, 2)
            orphans = set(vmm_pids(daemon.data_dir)) - _recorded_pids(daemon)
            assert orphans == set(), (delay, orphans)
            slots = {p.name for p in daemon.data_dir.glob("pool/*/*")}
            assert {ns.removeprefix(names.HOLDER_NETNS_PREFIX) for ns in _holders(daemon)} == (
                slots if nics else set()
            ), delay
            state = rpc.state(clone)
            assert state in ("VM_STATE_RUNNING", "VM_STATE_CREATED"), (delay, state)
            if state == "VM_STATE_CREATED":  # the boot was undone: it boots now (from the pool)
                rpc.ok("BootVm", {"vm_id": clone, **READY})
            deadline = time.monotonic() + 60
            while rpc.info(clone)["backend_info"].get("guest_ready") != "true":
                assert time.monotonic() < deadline, rpc.info(clone)
                time.sleep(0.2)
            assert rpc.exec(clone, "cat", "/run/metald/vm_id").strip() == clone, delay
            if nics:  # its own MAC, on a TAP of its own namespace
                mac = rpc.info(clone)["network_info"]["interfaces"][0]["guest_mac"]
                assert rpc.exec(clone, "cat", "/sys/class/net/eth0/address").strip() == mac, delay
        for vm_id in (*clones, source):
            rpc.ok("DeleteVm", {"vm_id": vm_id, "force": True})
        rpc.ok("DeleteSnapshot", {"snapshot_id": snap})
        assert vmm_pids(daemon.data_dir) == [] and _pool_processes(daemon) == []
        assert _holders(daemon) == [] and _vm_namespaces(daemon) == []
        assert list((daemon.data_dir / "pool").iterdir()) == []
        assert list((daemon.data_dir / "snapshots").iterdir()) == []
