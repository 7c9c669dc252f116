"""Warm pools over the API, on real guests: SnapshotVm with warm_pool_size fills the pool (/health,
/metrics), a clone's BootVm takes a waiting QEMU and is its own correct machine, the pool refills,
a kill -9 of the daemon leaves no slot behind and the next daemon refills; deleting the clones and
the snapshot leaves no process, cgroup or file. With NICs: the slots' TAPs wait in holder
namespaces, two pool-born clones on one customer network reach each other with their own MACs and
addresses, and nothing (holder, VM namespace, TAP) is left at the end. Traffic stays between the
guests, inside namespaces this test's daemon made."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from metald.network import names, plumbing
from tests.conftest import serving
from tests.support.clones import READY, assert_own_identity
from tests.support.daemon import Daemon, vmm_pids
from tests.support.rpc import Rpc

pytestmark = pytest.mark.e2e

POOL_FILL_TIMEOUT = 120.0


@pytest.fixture
def own_daemon(tmp_path: Path, assets_dir: Path) -> Iterator[Daemon]:
    with serving(Daemon(tmp_path / "metald", assets_dir)) as d:
        yield d


def _metric(daemon: Daemon, name: str) -> float:
    text = httpx.get(f"{daemon.url}/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def _pool_check(daemon: Daemon) -> dict[str, str]:
    check: dict[str, str] = httpx.get(f"{daemon.url}/health", timeout=10).json()["checks"]["warm_pool"]
    return check


def _wait_ready_slots(daemon: Daemon, count: int) -> None:
    deadline = time.monotonic() + POOL_FILL_TIMEOUT
    while _metric(daemon, 'unkey_metald_warm_pool_slots{state="ready"}') != count:
        assert time.monotonic() < deadline, _pool_check(daemon)
        time.sleep(0.2)


def _slot_pids(daemon: Daemon) -> set[int]:
    """The QEMUs waiting in the pool, as their supervisors recorded them, if they are alive."""
    pids = set()
    for state in (daemon.data_dir / "pool").glob("*/*/vmm.json"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(json.loads(state.read_text())["pid"])
            if pid in vmm_pids(daemon.data_dir):
                pids.add(pid)
    return pids


def _pool_processes(daemon: Daemon) -> list[int]:
    """Any process (QEMU, supervisor) working in the pool's directory."""
    pool = str(daemon.data_dir / "pool")
    return [pid for pid in vmm_pids(daemon.data_dir) if os.readlink(f"/proc/{pid}/cwd").startswith(pool)]


def _pool_cgroups(daemon: Daemon, snapshot_id: str) -> list[str]:
    """Cgroups of this daemon's slots (named <slot>-<hash of the slot's directory>)."""
    found = []
    for path in glob.glob("/sys/fs/cgroup/*/metald/pool_*") + glob.glob("/sys/fs/cgroup/metald/pool_*"):
        slot, _, digest = Path(path).name.rpartition("-")
        slot_dir = daemon.data_dir / "pool" / snapshot_id / slot
        if hashlib.sha256(str(slot_dir).encode()).hexdigest()[:8] == digest:
            found.append(path)
    return found


def test_a_clone_boots_from_the_warm_pool(own_daemon: Daemon, customer: str) -> None:
    daemon = own_daemon
    rpc = Rpc(daemon.url, customer)
    source = rpc.create({})
    rpc.ok("BootVm", {"vm_id": source, **READY})
    taken = rpc.ok("SnapshotVm", {"vm_id": source, "warm_pool_size": 2})
    snap = taken["snapshot_id"]
    assert rpc.ok("ListSnapshots", {})["snapshots"][0]["warm_pool_size"] == 2
    _wait_ready_slots(daemon, 2)
    assert _metric(daemon, "unkey_metald_warm_pool_target_slots") == 2
    assert "2/2 slots ready" in _pool_check(daemon)["detail"]
    waiting = _slot_pids(daemon)
    assert len(waiting) == 2

    time.sleep(2.0)  # the snapshot ages: the clone's clock must not be behind by as much
    clone = rpc.create({}, snapshot_id=snap)
    assert rpc.ok("BootVm", {"vm_id": clone, **READY})["state"] == "VM_STATE_RUNNING"
    info = rpc.info(clone)["backend_info"]
    assert info["restored_from"] == snap and info["warm_pool_slot"].startswith("pool_")
    assert int(info["process_id"]) in waiting  # the QEMU that waited in the pool
    assert _metric(daemon, "unkey_metald_warm_pool_hits_total") == 1
    assert_own_identity(rpc, clone)
    _wait_ready_slots(daemon, 2)  # refilled
    assert len(_slot_pids(daemon)) == 2 and int(info["process_id"]) not in _slot_pids(daemon)

    # kill -9 of the daemon: the next one removes the slots left waiting and fills its own; the
    # clone is re-adopted (by its slot's QEMU name) and still answers.
    left = _slot_pids(daemon)
    daemon.restart(hard=True)
    _wait_ready_slots(daemon, 2)
    assert not left & set(vmm_pids(daemon.data_dir)) and len(_slot_pids(daemon)) == 2
    assert rpc.info(clone)["state"] == "VM_STATE_RUNNING"
    assert int(rpc.info(clone)["backend_info"]["process_id"]) == int(info["process_id"])
    assert rpc.exec(clone, "cat", "/run/metald/vm_id").strip() == clone
    # A reboot would boot the slot's kernel command line: it moves to a QEMU of its own.
    rpc.ok("RebootVm", {"vm_id": clone, "force": True})
    rebooted = rpc.info(clone)["backend_info"]
    assert "warm_pool_slot" not in rebooted and int(rebooted["process_id"]) != int(info["process_id"])
    deadline = time.monotonic() + 90
    while rpc.info(clone)["backend_info"].get("guest_ready") != "true":
        assert time.monotonic() < deadline, rpc.info(clone)
        time.sleep(0.2)
    assert f"metald.vm_id={clone}" in rpc.exec(clone, "cat", "/proc/cmdline")

    # Deleting the snapshot stops its pool; deleting the clones and the source leaves nothing.
    assert rpc.ok("DeleteSnapshot", {"snapshot_id": snap}) == {"success": True}
    assert _pool_processes(daemon) == [] and _pool_cgroups(daemon, snap) == []
    assert list((daemon.data_dir / "pool").iterdir()) == []
    for vm_id in (clone, source):
        rpc.ok("DeleteVm", {"vm_id": vm_id, "force": True})
    assert vmm_pids(daemon.data_dir) == []
    assert list((daemon.data_dir / "snapshots").iterdir()) == []
    assert list((daemon.data_dir / "vms").iterdir()) == []


def _holders(daemon: Daemon) -> list[str]:
    """This daemon's TAP holder namespaces (of warm pool slots with NICs)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    held = [line.split()[0] for line in out.splitlines() if line.startswith(names.HOLDER_NETNS_PREFIX)]
    return [ns for ns in held if asyncio.run(plumbing.belongs_to(daemon.host_netns, ns))]


def _links(netns: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["ip", "-n", netns, "-j", "addr", "show"], capture_output=True, text=True, check=True
    )
    return [link for link in json.loads(out.stdout) if link["ifname"] != "lo"]


def _vm_namespaces(daemon: Daemon) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    spaces = [line.split()[0] for line in out.splitlines() if line.startswith(names.VM_NETNS_PREFIX)]
    return [ns for ns in spaces if asyncio.run(plumbing.belongs_to(daemon.host_netns, ns))]


def test_clones_with_nics_boot_from_the_warm_pool_and_reach_each_other(
    own_daemon: Daemon, customer: str
) -> None:
    daemon = own_daemon
    rpc = Rpc(daemon.url, customer)
    nic = {"network": [{"interface_id": "eth0"}]}
    source = rpc.create(nic)
    rpc.ok("BootVm", {"vm_id": source, **READY})
    snap = rpc.ok("SnapshotVm", {"vm_id": source, "warm_pool_size": 2})["snapshot_id"]
    _wait_ready_slots(daemon, 2)
    assert "2/2 slots ready" in _pool_check(daemon)["detail"]
    # Each slot's TAP waits in a namespace of its own: down, no address, no bridge.
    holders = _holders(daemon)
    assert len(holders) == 2
    for holder in holders:
        [tap] = _links(holder)
        assert tap["ifname"] == "held0" and "UP" not in tap["flags"] and tap["addr_info"] == []
        assert "master" not in tap
    waiting = _slot_pids(daemon)

    clones = [rpc.create(nic, snapshot_id=snap) for _ in range(2)]
    seen = []
    for clone in clones:
        rpc.ok("BootVm", {"vm_id": clone, **READY})
        info = rpc.info(clone)
        assert info["backend_info"]["warm_pool_slot"].startswith("pool_")
        assert int(info["backend_info"]["process_id"]) in waiting
        [interface] = info["network_info"]["interfaces"]
        mac, address = interface["guest_mac"], interface["guest_ipv4"].split("/")[0]
        # Its own MAC and address inside the guest, not the snapshot's.
        assert rpc.exec(clone, "cat", "/sys/class/net/eth0/address").strip() == mac
        assert f"inet {address}/" in rpc.exec(clone, "ip", "-4", "addr", "show", "eth0")
        seen.append((clone, mac, address))
    assert len({mac for _, mac, _ in seen}) == 2
    assert _metric(daemon, "unkey_metald_warm_pool_hits_total") == 2
    for (clone, _, _), (_, _, other) in zip(seen, reversed(seen), strict=True):
        assert rpc.exec(clone, "ping", "-c", "1", "-W", "5", other), (clone, other)
    _wait_ready_slots(daemon, 2)  # refilled, with new holders; the taken ones' are gone
    assert len(_holders(daemon)) == 2 and not set(_holders(daemon)) & set(holders)

    # kill -9 with slots waiting: the next daemon removes their QEMUs and holders, fills its own.
    left, left_holders = _slot_pids(daemon), _holders(daemon)
    daemon.restart(hard=True)
    _wait_ready_slots(daemon, 2)
    assert not left & set(vmm_pids(daemon.data_dir)) and not set(_holders(daemon)) & set(left_holders)
    assert rpc.exec(clones[0], "ping", "-c", "1", "-W", "5", seen[1][2])
    # A daemon that stops (SIGTERM) stops its slots and their holders; its VMs run on.
    daemon.stop()
    assert _holders(daemon) == [] and _pool_processes(daemon) == []
    daemon.start()
    _wait_ready_slots(daemon, 2)
    assert len(_holders(daemon)) == 2
    assert rpc.exec(clones[1], "ping", "-c", "1", "-W", "5", seen[0][2])

    assert rpc.ok("DeleteSnapshot", {"snapshot_id": snap}) == {"success": True}
    assert _holders(daemon) == [] and _pool_processes(daemon) == []
    for vm_id in (*clones, source):
        rpc.ok("DeleteVm", {"vm_id": vm_id, "force": True})
    # The pool-born clones ran in their slots' cgroups, removed as their QEMUs ended.
    assert (
        vmm_pids(daemon.data_dir) == [] and _vm_namespaces(daemon) == [] and _pool_cgroups(daemon, snap) == []
    )
    assert list((daemon.data_dir / "snapshots").iterdir()) == []
