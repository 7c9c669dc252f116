"""Snapshots and clones over the API, on real guests: SnapshotVm of a running VM, clones restored
from it that hold what its RAM held, ownership, listing, deletion that waits for the last clone."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.api.test_guest_lifecycle import guest_exec
from tests.support.clones import READY, assert_own_identity
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

pytestmark = pytest.mark.e2e


def _reason(payload: dict[str, Any]) -> str:
    return str(payload["details"][0]["debug"]["reason"])


def test_snapshot_clones_and_deletion(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    vms = daemon.data_dir / "vms"
    source = rpc.create({})
    rpc.ok("BootVm", {"vm_id": source, **READY})
    # Written, never synced: only the guest's page cache (its RAM) holds it.
    assert guest_exec(vms / source, "echo unsynced > /root/unsynced") == (0, "")

    taken = rpc.ok("SnapshotVm", {"vm_id": source, "metadata": {"role": "template"}})
    snap = taken["snapshot_id"]
    assert snap.startswith("snap_") and taken["state"] == "VM_STATE_RUNNING" and int(taken["size_bytes"]) > 0
    assert rpc.state(source) == "VM_STATE_RUNNING"
    assert guest_exec(vms / source, "echo later > /root/later") == (0, "")
    listed = rpc.ok("ListSnapshots", {})
    assert [s["snapshot_id"] for s in listed["snapshots"]] == [snap] and listed["total_count"] == 1
    assert listed["snapshots"][0]["source_vm_id"] == source
    assert listed["snapshots"][0]["metadata"] == {"role": "template"}

    # Another customer sees nothing of it and cannot clone or delete it.
    status, body = rpc.error("CreateVm", {"snapshot_id": snap}, customer="intruder" + customer)
    assert (status, _reason(body)) == (403, "SNAPSHOT_NOT_OWNED")
    status, body = rpc.error("DeleteSnapshot", {"snapshot_id": snap}, customer="intruder" + customer)
    assert (status, _reason(body)) == (403, "SNAPSHOT_NOT_OWNED")
    status, body = rpc.error("CreateVm", {"snapshot_id": "snap_nope"})
    assert (status, _reason(body)) == (404, "SNAPSHOT_NOT_FOUND")
    status, body = rpc.error(
        "CreateVm", {"snapshot_id": snap, "config": {"memory": {"size_bytes": 512 * 1024 * 1024}}}
    )
    assert status == 400 and body["details"][0]["debug"]["metadata"]["field"] == "config.memory.size_bytes"

    time.sleep(3.0)  # the snapshot ages: its clones' clocks must not be behind by as much
    clones = [rpc.create({}, snapshot_id=snap) for _ in range(2)]
    for clone in clones:
        started = time.monotonic()
        assert rpc.ok("BootVm", {"vm_id": clone, **READY})["state"] == "VM_STATE_RUNNING"
        assert time.monotonic() - started < 30  # a restore, not a cold boot's 60 s allowance
        info = rpc.info(clone)
        assert info["backend_info"]["restored_from"] == snap and info["backend_info"]["guest_ready"] == "true"
        assert rpc.exec(clone, "ls", "/root").split() == ["unsynced"]  # not the source's later file
        assert rpc.exec(clone, "cat", "/root/unsynced") == "unsynced\n"
        assert_own_identity(rpc, clone)  # and its own randomness, below
    randoms = {rpc.exec(clone, "sh", "-c", "head -c 32 /dev/urandom | od -An -tx1") for clone in clones}
    assert len(randoms) == 2

    # Deleted: gone from the list at once; the files stay for the clones.
    assert rpc.ok("DeleteSnapshot", {"snapshot_id": snap}) == {"success": True}
    assert rpc.ok("ListSnapshots", {}).get("snapshots", []) == []
    files = daemon.data_dir / "snapshots" / snap
    assert files.exists()

    # A clone's second boot is a cold boot of its own disk (a ready line of its own this time).
    assert guest_exec(vms / clones[0], "echo mine > /root/mine; sync") == (0, "")
    rpc.ok("ShutdownVm", {"vm_id": clones[0], "force": True})
    rpc.ok("BootVm", {"vm_id": clones[0], **READY})
    assert f"METALD_READY vm_id={clones[0]} " in (vms / clones[0] / "console.log").read_text()
    assert guest_exec(vms / clones[0], "cat /root/mine") == (0, "mine")

    for clone in clones:
        rpc.ok("DeleteVm", {"vm_id": clone, "force": True})
    assert not files.exists()
