"""Daemon crash during snapshots: `kill -9` of metald in the middle of SnapshotVm and of a clone's
BootVm (its restore), on real QEMU (TCG) guests.

SnapshotVm has no test-only hook to stop it halfway, so the kill comes at fractions (0..1.1) of how
long an uncut SnapshotVm of the same VM took just before: before the guest is stopped, during the
device-state save, during the RAM and disk copies, around the rename and just after the answer. A
clone's BootVm is cut likewise. Whatever point each kill hit, after the restart:

- no half-written snapshot is listed or left on disk: the snapshots directory holds exactly the
  listed snapshots, each complete; a SnapshotVm answered before the kill is listed;
- the source VM is back in its state in the same QEMU: a RUNNING source runs again (its guest
  answers), a PAUSED one is paused and resumes later;
- an unanswered clone boot is either finished (RUNNING, its own identity) or undone (CREATED, no
  QEMU), and then boots again by restoring;
- the host holds one QEMU, supervisor, cgroup, namespace and TAP per running VM, nothing else.

At the end, deleting every clone and the snapshots leaves no file, process, cgroup, namespace or TAP.
"""

from __future__ import annotations

import base64
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from metald.network import names
from tests.reliability.common import knob, wait_for
from tests.reliability.conftest import MakeDaemon
from tests.reliability.host import Footprint, cgroups_of, db_rows
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

CUSTOMER = "snapcrash"
NIC = {"network": [{"interface_id": "eth0"}]}
READY = {"wait_for_ready": True, "wait_timeout_seconds": 90}
ACTIVE = {"VM_STATE_RUNNING", "VM_STATE_PAUSED"}
# Where in an uncut call the kill lands (fractions of its duration); the long form tries more.
FRACTIONS = [0.02, 0.2, 0.4, 0.6, 0.8, 1.1]
LONG_FRACTIONS = [i / 20 for i in range(23)]
PAUSED_FRACTIONS = [0.3, 0.7]
SNAPSHOT_FILES = {"ram", "state", "disks.json", "snapshot.json"}


@dataclass
class Cut:
    """One call sent `lead` seconds before the kill, and what came back before it."""

    method: str
    body: dict[str, Any]
    lead: float
    status: int | None = None
    payload: dict[str, Any] | None = None


class Scene:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.rpc = Rpc(daemon.url, CUSTOMER)
        self.snapshots: set[str] = set()  # complete, listed
        self.vms: dict[str, str] = {}  # vm_id -> state
        self.pids: dict[str, int] = {}
        self.nic: set[str] = set()
        self.stats: Counter[str] = Counter()

    @property
    def snapshots_dir(self) -> Path:
        return self.daemon.data_dir / "snapshots"

    def timed(self, method: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        started = time.monotonic()
        result = self.rpc.ok(method, body)
        return time.monotonic() - started, result

    def cut(self, method: str, body: dict[str, Any], lead: float) -> Cut:
        """Send the call, SIGKILL the daemon `lead` seconds later, restart it."""
        call = Cut(method, body, lead)
        client = Rpc(self.daemon.url, CUSTOMER)
        client.client.get("/health")  # connected beforehand: the lead counts from the request

        def send() -> None:
            try:
                resp = client.call(method, body)
                call.status, call.payload = resp.status_code, resp.json()
            except httpx.TransportError:
                pass
            finally:
                client.client.close()

        thread = threading.Thread(target=send)
        thread.start()
        time.sleep(lead)
        self.daemon.kill9()
        thread.join(30)
        for (pending,) in db_rows(self.daemon.data_dir, "SELECT pending FROM vms WHERE pending != ''"):
            self.stats[f"vm {pending}"] += 1
        for (pending,) in db_rows(self.daemon.data_dir, "SELECT pending FROM snapshots WHERE pending != ''"):
            self.stats[f"snapshot {pending}"] += 1
        self.stats[f"{method} {'answered' if call.status else 'cut'}"] += 1
        self.daemon.start()
        return call

    # ---- checks ------------------------------------------------------------------------------

    def listed_snapshots(self) -> set[str]:
        return {
            s["snapshot_id"] for s in self.rpc.ok("ListSnapshots", {"page_size": 1000}).get("snapshots", [])
        }

    def check_snapshots(self, where: str, maybe: str = "", answered: bool = False) -> None:
        """Listed: the known ones, plus `maybe` if it completed; on disk: exactly what is listed."""
        listed = self.listed_snapshots()
        if maybe and (answered or maybe in listed):
            self.snapshots.add(maybe)
        assert listed == self.snapshots, f"{where}: listed {listed}, expected {self.snapshots}"
        on_disk = {p.name for p in self.snapshots_dir.iterdir()} if self.snapshots_dir.is_dir() else set()
        assert on_disk == listed, f"{where}: snapshot files {on_disk}, listed {listed}"
        for snap in listed:
            files = {p.name for p in (self.snapshots_dir / snap).iterdir()}
            assert files >= SNAPSHOT_FILES and any(f.endswith(".qcow2") for f in files), (where, snap, files)
        pending = db_rows(self.daemon.data_dir, "SELECT snapshot_id FROM snapshots WHERE pending != ''")
        assert not pending, f"{where}: pending snapshots left in the store: {pending}"

    def guest_answers(self, vm_id: str) -> str:
        """The guest runs: its agent executes a command (a stopped QEMU never answers)."""
        resp = self.rpc.client.post(
            "/vmprovisioner.v1.VmService/ExecVm",
            json={"vm_id": vm_id, "command": ["cat", "/run/metald/vm_id"], "timeout_seconds": 10},
            headers={"Authorization": f"Bearer dev_customer_{CUSTOMER}"},
            timeout=30,
        )
        assert resp.status_code == 200, f"{vm_id}'s guest does not answer: {resp.status_code} {resp.text}"
        return base64.b64decode(resp.json().get("stdout", "")).decode().strip()

    def check_vm(self, where: str, vm_id: str, allowed: set[str]) -> str:
        info = self.rpc.info(vm_id)
        state = str(info["state"])
        assert state in allowed, f"{where}: {vm_id} is {state}, expected one of {sorted(allowed)}"
        if state in ACTIVE:
            pid = int(info["backend_info"]["process_id"])
            if self.vms.get(vm_id) == state:
                assert pid == self.pids[vm_id], f"{where}: {vm_id} runs as {pid}, was {self.pids[vm_id]}"
            self.pids[vm_id] = pid
        if state == "VM_STATE_RUNNING":
            assert self.guest_answers(vm_id) == vm_id, f"{where}: {vm_id}'s guest has another identity"
        self.vms[vm_id] = state
        return state

    def check_host(self, where: str) -> None:
        """One QEMU, supervisor and cgroup per active VM; a namespace and TAP per active VM with a
        NIC; nothing pending in the store."""
        fp = Footprint.of(self.daemon, self.vms)
        active = {vm_id for vm_id, state in self.vms.items() if state in ACTIVE}
        with_nic = active & self.nic
        assert set(fp.qemus) == {self.pids[v] for v in active}, (where, fp.qemus, active)
        assert len(fp.supervisors) == len(active), (where, fp.supervisors)
        assert set(fp.vm_dirs) == set(self.vms), (where, fp.vm_dirs)
        assert set(fp.namespaces) == {names.vm_netns(v) for v in with_nic}, (where, fp.namespaces)
        assert set(fp.taps) == {f"{names.vm_netns(v)}/{names.tap_device(v, 0)}" for v in with_nic}, where
        assert set(fp.cgroups) == cgroups_of(active, self.daemon.data_dir / "vms"), (where, fp.cgroups)
        assert not fp.root_links and not fp.zombies, (where, fp)
        pending = db_rows(self.daemon.data_dir, "SELECT vm_id, pending FROM vms WHERE pending != ''")
        assert not pending, f"{where}: half-done operations left: {pending}"


def fractions() -> list[float]:
    return LONG_FRACTIONS if knob("SNAPSHOT_LONG", 0, 1) else FRACTIONS


def test_kill9_during_snapshot_and_clone_boot_leaves_nothing_half_done(make_daemon: MakeDaemon) -> None:
    scene = Scene(make_daemon(name="rel-snc"))
    rpc = scene.rpc
    source = rpc.create(NIC)
    scene.nic.add(source)
    rpc.ok("BootVm", {"vm_id": source, **READY})
    scene.check_vm("boot", source, {"VM_STATE_RUNNING"})
    took, first = scene.timed("SnapshotVm", {"vm_id": source})
    scene.snapshots.add(first["snapshot_id"])
    print(f"an uncut SnapshotVm took {took * 1000:.0f} ms")

    # SnapshotVm of a running VM, cut at each point.
    for n, fraction in enumerate(fractions()):
        snap = f"snap_cut-{n}"
        call = scene.cut("SnapshotVm", {"vm_id": source, "snapshot_id": snap}, fraction * took)
        where = f"SnapshotVm cut at {fraction:.2f} ({call.status or 'unanswered'})"
        print(where)
        assert call.status in (None, 200), (where, call.payload)
        scene.check_snapshots(where, snap, answered=call.status == 200)
        scene.check_vm(where, source, {"VM_STATE_RUNNING"})
        scene.check_host(where)

    # A paused source stays paused, and can be resumed and snapshotted again afterwards.
    rpc.ok("PauseVm", {"vm_id": source})
    scene.vms[source] = "VM_STATE_PAUSED"
    for n, fraction in enumerate(PAUSED_FRACTIONS):
        snap = f"snap_paused-{n}"
        call = scene.cut("SnapshotVm", {"vm_id": source, "snapshot_id": snap}, fraction * took)
        where = f"SnapshotVm of a paused VM cut at {fraction:.2f} ({call.status or 'unanswered'})"
        print(where)
        scene.check_snapshots(where, snap, answered=call.status == 200)
        scene.check_vm(where, source, {"VM_STATE_PAUSED"})
        scene.check_host(where)
    assert rpc.ok("SnapshotVm", {"vm_id": source, "snapshot_id": "snap_after"})["state"] == "VM_STATE_PAUSED"
    scene.snapshots.add("snap_after")
    assert rpc.ok("ResumeVm", {"vm_id": source})["state"] == "VM_STATE_RUNNING"
    scene.check_vm("resumed", source, {"VM_STATE_RUNNING"})

    # A clone's BootVm (its restore), cut at each point.
    template = first["snapshot_id"]
    probe = rpc.create(NIC, snapshot_id=template)
    scene.nic.add(probe)
    boot_took, _ = scene.timed("BootVm", {"vm_id": probe})
    scene.check_vm("clone boot", probe, {"VM_STATE_RUNNING"})
    print(f"an uncut clone BootVm took {boot_took * 1000:.0f} ms")
    clones = [probe]
    for fraction in fractions():
        clone = rpc.create(NIC, snapshot_id=template)
        scene.nic.add(clone)
        scene.vms[clone] = "VM_STATE_CREATED"
        clones.append(clone)
        call = scene.cut("BootVm", {"vm_id": clone}, fraction * boot_took)
        where = f"clone BootVm cut at {fraction:.2f} ({call.status or 'unanswered'})"
        print(where)
        allowed = {"VM_STATE_RUNNING"} if call.status == 200 else {"VM_STATE_CREATED", "VM_STATE_RUNNING"}
        state = scene.check_vm(where, clone, allowed)
        scene.stats[f"clone {state[9:].lower()} after the restart"] += 1
        scene.check_host(where)
        if state == "VM_STATE_CREATED":  # undone: it restores when booted again
            rpc.ok("BootVm", {"vm_id": clone})
            scene.check_vm(f"{where}, booted again", clone, {"VM_STATE_RUNNING"})
            assert rpc.info(clone)["backend_info"]["restored_from"] == template
        # Two clones at most run at once besides the source: two cores.
        rpc.ok("ShutdownVm", {"vm_id": clone, "force": True})
        scene.check_vm(f"{where}, shut down", clone, {"VM_STATE_SHUTDOWN"})
        scene.check_host(f"{where}, shut down")
    print(f"outcomes: {dict(sorted(scene.stats.items()))}")
    assert scene.stats["vm snapshotting"] >= 1, f"no kill caught a snapshot halfway: {scene.stats}"

    # Everything goes, and nothing is left.
    for vm_id in [*clones, source]:
        rpc.ok("DeleteVm", {"vm_id": vm_id, "force": True})
        del scene.vms[vm_id]
    for snap in sorted(scene.snapshots):
        rpc.ok("DeleteSnapshot", {"snapshot_id": snap})
    scene.snapshots.clear()
    scene.check_snapshots("after deleting everything")
    scene.check_host("after deleting everything")
    fp = Footprint.of(scene.daemon, [*clones, source])
    assert not (fp.vm_dirs | fp.sockets | fp.namespaces | fp.taps | fp.qemus | fp.supervisors | fp.cgroups), (
        fp
    )
    wait_for(lambda: not any(scene.snapshots_dir.iterdir()), 5, "snapshot files removed")
    assert db_rows(scene.daemon.data_dir, "SELECT COUNT(*) FROM snapshots") == [(0,)]
