"""Disk full: the data dir (SQLite store and VM directories) on a tiny tmpfs that the test fills.

With the disk full, every write RPC fails with RESOURCE_EXHAUSTED (reason STORE_FULL when the
store cannot write) and changes nothing: no VM half-created, half-booted or half-deleted, no QEMU
left running, no directory left behind; reads keep working and /health stays 200. With only a
little space left (enough for the store, not for a VM's files), CreateVm still fails with
RESOURCE_EXHAUSTED and leaves nothing. A daemon killed while the disk is full restarts and serves.
When space returns, every write works again, and the store is intact: every VM recorded before is
there with the same record, and SQLite's integrity check passes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.reliability.conftest import own_daemon
from tests.reliability.host import db_rows, qemu_pids
from tests.support.rpc import Rpc

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

SIZE = "24m"
CUSTOMER = "disk"
ACTIVE = ("VM_STATE_RUNNING", "VM_STATE_PAUSED")
NEARLY_FULL = (4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10)  # bytes left free (phase 2)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0755", "metald-rel", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        for _ in range(50):  # the daemon's VMMs may take a moment to let go of their files
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int = 0) -> Path:
    """Take every free byte of the filesystem but `leave`."""
    filler = mnt / "filler"
    with contextlib.suppress(FileNotFoundError):
        filler.unlink(missing_ok=True)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 20, 4096):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def error_of(resp: httpx.Response) -> tuple[str, str]:
    """(code, ErrorInfo reason) of a Connect error answer."""
    body = resp.json()
    reason = next((d.get("debug", {}).get("reason", "") for d in body.get("details", [])), "")
    return str(body.get("code")), str(reason)


def records(rpc: Rpc) -> dict[str, dict[str, Any]]:
    page = rpc.ok("ListVms", {"page_size": 1000})
    out = {}
    for vm in page.get("vms", []):
        info = rpc.info(vm["vm_id"])
        out[vm["vm_id"]] = {k: info[k] for k in ("config", "state", "created_at")}
        out[vm["vm_id"]]["shutdown_reason"] = info["backend_info"].get("shutdown_reason", "")
        out[vm["vm_id"]]["pid"] = info["backend_info"].get("process_id", "")
    return out


def difference(was: dict[str, Any] | None, now: dict[str, Any] | None) -> str:
    if was is None:
        return f"appeared, {now and now['state']}"
    if now is None:
        return f"vanished (was {was['state']})"
    return "changed: " + ", ".join(f"{k} {was[k]!r} -> {now[k]!r}" for k in was if was[k] != now.get(k))


def test_full_disk_fails_cleanly_loses_nothing_and_recovers(tiny_fs: Path, assets_dir: Path) -> None:
    problems: list[str] = []
    data_dir = tiny_fs / "data"
    with own_daemon(data_dir, assets_dir, "--no-network-enabled", name="rel-dsk") as daemon:
        rpc = Rpc(daemon.url, CUSTOMER)
        for i in range(5):
            rpc.create(vm_id=f"keep-{i}", config={"metadata": {"n": str(i)}})
        rpc.ok("BootVm", {"vm_id": "keep-4"})
        rpc.ok("ShutdownVm", {"vm_id": "keep-4", "force": True})
        stored = records(rpc)
        assert len(stored) == 5

        def refused(what: str, resp: httpx.Response, reasons: set[str] | None = None) -> bool:
            """The answer is RESOURCE_EXHAUSTED (with one of `reasons`); else note the problem."""
            if resp.status_code == 200:
                return False
            code, reason = error_of(resp)
            if resp.status_code != 429 or code != "resource_exhausted" or (reasons and reason not in reasons):
                problems.append(f"{what}: {resp.status_code} {code}/{reason}: {resp.json().get('message')}")
            return True

        seen: set[str] = set()

        def note(what: str, problem: str) -> None:
            """Each problem once, with where it was first seen."""
            if problem not in seen:
                seen.add(problem)
                problems.append(f"{what}: {problem}")

        def unchanged(what: str) -> None:
            now = records(rpc)
            for vm_id in sorted(set(now) | set(stored)):
                if now.get(vm_id) != stored.get(vm_id):
                    note(what, f"{vm_id} {difference(stored.get(vm_id), now.get(vm_id))}")
            dirs = sorted(p.name for p in (data_dir / "vms").iterdir())
            if dirs != sorted(stored):
                note(what, f"VM dirs {dirs} != VMs {sorted(stored)}")
            running = {r["pid"] for r in stored.values() if r["state"] in ACTIVE}
            if {str(p) for p in qemu_pids(data_dir)} != running:
                note(what, f"QEMU processes {qemu_pids(data_dir)}, of running VMs {running}")

        # 1. Full: writes refused with STORE_FULL and without effect; reads and /health fine.
        filler = fill(tiny_fs)
        for i in range(3):
            resp = rpc.call("CreateVm", {"vm_id": f"new-{i}", "config": {}})
            if not refused(f"full: CreateVm new-{i}", resp, {"STORE_FULL"}):
                problems.append(f"full: CreateVm new-{i} succeeded on a full disk")
        for method, body in (
            ("BootVm", {"vm_id": "keep-1"}),
            ("DeleteVm", {"vm_id": "keep-2", "force": True}),
            ("BootVm", {"vm_id": "keep-4", "wait_for_ready": True}),
        ):
            if not refused(f"full: {method} {body['vm_id']}", rpc.call(method, body), {"STORE_FULL"}):
                problems.append(f"full: {method} {body['vm_id']} succeeded on a full disk")
        unchanged("full")
        health = httpx.get(f"{daemon.url}/health", timeout=10)
        if health.status_code != 200 or health.json()["checks"]["store"]["status"] != "healthy":
            problems.append(f"full: /health {health.status_code} {health.text[:300]}")

        # 2. Nearly full: room for the store's few pages but not for a VM's files. CreateVm, BootVm
        # and ShutdownVm either work or are refused and change nothing.
        for leave in NEARLY_FULL:
            fill(tiny_fs, leave)
            vm_id = f"part-{leave >> 10}k"
            resp = rpc.call("CreateVm", {"vm_id": vm_id, "config": {}})
            if refused(f"{leave >> 10} KiB free: CreateVm", resp):
                unchanged(f"{leave >> 10} KiB free, after a refused CreateVm")
            else:  # it fitted: then it is whole
                stored[vm_id] = records(rpc)[vm_id]
                if not (data_dir / "vms" / vm_id).is_dir():
                    problems.append(f"{leave >> 10} KiB free: {vm_id} created without its directory")
        for leave in NEARLY_FULL:  # BootVm: refused and not started, or running
            fill(tiny_fs, leave)
            resp = rpc.call("BootVm", {"vm_id": "keep-3"})
            if refused(f"{leave >> 10} KiB free: BootVm", resp):
                unchanged(f"{leave >> 10} KiB free, after a refused BootVm")
            else:
                if rpc.state("keep-3") != "VM_STATE_RUNNING" or len(qemu_pids(data_dir)) != 1:
                    problems.append(f"{leave >> 10} KiB free: BootVm answered 200 but keep-3 does not run")
                filler.unlink(missing_ok=True)
                rpc.ok("ShutdownVm", {"vm_id": "keep-3", "force": True})
                stored["keep-3"] = records(rpc)["keep-3"]
        filler.unlink(missing_ok=True)
        rpc.ok("BootVm", {"vm_id": "keep-3"})
        stored["keep-3"] = records(rpc)["keep-3"]
        for leave in NEARLY_FULL:  # ShutdownVm: refused and still running, or stopped
            fill(tiny_fs, leave)
            resp = rpc.call("ShutdownVm", {"vm_id": "keep-3", "force": True})
            if refused(f"{leave >> 10} KiB free: ShutdownVm", resp):
                unchanged(f"{leave >> 10} KiB free, after a refused ShutdownVm")
            else:
                if rpc.state("keep-3") != "VM_STATE_SHUTDOWN" or qemu_pids(data_dir):
                    problems.append(f"{leave >> 10} KiB free: ShutdownVm answered 200 but keep-3 runs on")
                filler.unlink(missing_ok=True)
                rpc.ok("BootVm", {"vm_id": "keep-3"})
                stored["keep-3"] = records(rpc)["keep-3"]
        filler.unlink(missing_ok=True)
        if rpc.state("keep-3") != "VM_STATE_SHUTDOWN":
            rpc.ok("ShutdownVm", {"vm_id": "keep-3", "force": True})
        stored["keep-3"] = records(rpc)["keep-3"]

        # 3. Killed while full: comes back (recovery needs no space) and serves what it has.
        filler = fill(tiny_fs)
        daemon.kill9()
        daemon.start()
        unchanged("restarted on a full disk")

        # 4. Space returns: everything works again, and nothing was lost or corrupted.
        filler.unlink(missing_ok=True)
        rpc.create(vm_id="after-0")
        assert rpc.ok("BootVm", {"vm_id": "keep-1"})["state"] == "VM_STATE_RUNNING"
        assert rpc.ok("ShutdownVm", {"vm_id": "keep-1", "force": True})["state"] == "VM_STATE_SHUTDOWN"
        assert rpc.ok("DeleteVm", {"vm_id": "keep-2"}) == {"success": True}
        now = records(rpc)
        for vm_id, record in stored.items():
            if vm_id in ("keep-1", "keep-2"):
                continue
            if now.get(vm_id) != record:
                problems.append(f"after: {vm_id} {difference(record, now.get(vm_id))}")
        dirs = sorted(p.name for p in (data_dir / "vms").iterdir())
        if dirs != sorted(now):
            problems.append(f"after: VM dirs {dirs} != VMs {sorted(now)}")
        if (check := db_rows(data_dir, "PRAGMA integrity_check")) != [("ok",)]:
            problems.append(f"after: integrity_check {check}")
        if pending := db_rows(data_dir, "SELECT vm_id, pending FROM vms WHERE pending != ''"):
            problems.append(f"after: half-done operations in the store: {pending}")
        assert not problems, "\n".join(problems)
