"""QemuBackend snapshots and clones on real guests (TCG): the source runs on, clones restore."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from metald.backends.qemu.backend import QemuBackend
from metald.backends.qemu.snapshot import DEVICE_STATE, RAM_FILE
from metald.ports import LaunchSpec, SnapshotResult
from tests.e2e.conftest import kill_processes_under, tcg_backend
from tests.e2e.test_qemu_backend import READY_TIMEOUT, _agent_exec, launch_spec

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed"),
]


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[QemuBackend]:
    ram_dir = Path("/dev/shm") / f"metald-test-{os.getpid()}-{tmp_path.name}"
    made = tcg_backend(tmp_path / "state", ram_dir=ram_dir)
    try:
        yield made
    finally:
        await made.close()
        kill_processes_under(tmp_path)
        # RAM files are unnamed: nothing may be left in the directory, whatever happened.
        leftovers = list(ram_dir.iterdir()) if ram_dir.exists() else []
        shutil.rmtree(ram_dir, ignore_errors=True)
        assert leftovers == []


async def snapshotted_source(
    backend: QemuBackend, assets_dir: Path, tmp_path: Path
) -> tuple[LaunchSpec, Path, SnapshotResult]:
    """A source VM "vm-src" running with a file written but never synced (only the guest's page
    cache, its RAM, holds /root/unsynced), snapshotted into tmp_path/snapshots/snap-1."""
    source = launch_spec(assets_dir, tmp_path / "src", "vm-src")
    await backend.start(source)
    assert await backend.wait_ready("vm-src", READY_TIMEOUT)
    assert await _agent_exec(source.vm_dir, "echo unsynced > /root/unsynced") == (0, "")
    snap = tmp_path / "snapshots" / "snap-1"
    snap.parent.mkdir()
    return source, snap, await backend.snapshot("vm-src", snap)


async def test_snapshot_keeps_the_source_running_and_clones_restore_it(
    assets_dir: Path, tmp_path: Path, backend: QemuBackend
) -> None:
    assert backend.capabilities.supports_snapshots
    source, snap, result = await snapshotted_source(backend, assets_dir, tmp_path)
    assert result.size_bytes > 16 * 1024 * 1024  # the touched part of 256 MiB of RAM
    assert 0 < result.paused_seconds < 5
    assert {p.name for p in snap.iterdir()} >= {RAM_FILE, DEVICE_STATE, "disk0.qcow2"}
    assert (snap / "disk0.qcow2").stat().st_mode & 0o777 == 0o400  # frozen

    # The source runs on, in the state it was in, and writes on its own overlay.
    runtime = await backend.runtime("vm-src")
    assert runtime is not None and not runtime.paused
    assert await _agent_exec(source.vm_dir, "echo later > /root/later; cat /root/unsynced") == (0, "unsynced")

    clones = []
    for i in range(2):
        clone = dataclasses.replace(
            launch_spec(assets_dir, tmp_path / f"clone{i}", f"vm-clone{i}"), restore_from=snap
        )
        await backend.start(clone)
        assert await backend.wait_ready(clone.vm_id, READY_TIMEOUT)
        clones.append(clone)
    for clone in clones:
        rc, out = await _agent_exec(clone.vm_dir, "cat /root/unsynced; ls /root")
        assert rc == 0 and out.split() == ["unsynced", "unsynced"], out  # not the source's later file
        runtime = await backend.runtime(clone.vm_id)
        assert runtime is not None and runtime.guest_ready
    # Each clone writes on its own overlay, over the frozen one.
    assert await _agent_exec(clones[0].vm_dir, "echo mine > /root/mine; sync") == (0, "")
    assert (await _agent_exec(clones[1].vm_dir, "ls /root"))[1].split() == ["unsynced"]

    # A paused VM is snapshotted and stays paused.
    await backend.pause("vm-src")
    await backend.snapshot("vm-src", tmp_path / "snapshots" / "snap-2")
    runtime = await backend.runtime("vm-src")
    assert runtime is not None and runtime.paused
    await backend.resume("vm-src")

    # A clone's stop leaves the snapshot intact; the clone's next start cold-boots its own disk.
    await backend.stop("vm-clone0", graceful=False, timeout=0)
    assert (snap / RAM_FILE).exists()
    await backend.start(launch_spec(assets_dir, tmp_path / "clone0", "vm-clone0"))
    assert await backend.wait_ready("vm-clone0", READY_TIMEOUT)
    rc, out = await _agent_exec(clones[0].vm_dir, "cat /root/mine")
    assert (rc, out) == (0, "mine")
    for vm_id in ("vm-src", "vm-clone0", "vm-clone1"):
        await backend.stop(vm_id, graceful=False, timeout=0)
