"""Firecracker snapshots and clones against the Firecracker double (a real process under the real
supervisor, strict to the v1.17 spec and to Firecracker's rules: create only when paused, load only
into a fresh process, drives reopened at the recorded paths). Every request must fit the spec."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from metald.backends.firecracker import FirecrackerBackend
from metald.backends.firecracker.api import FirecrackerApi
from metald.backends.firecracker.snapshot import MANIFEST, MEM_FILE, RESTORED, VMSTATE, create_call
from metald.domain.errors import ErrorCode, MetaldError
from metald.ports import LaunchSpec, NicSpec
from tests.integration.firecracker_double import Contract, FakeFirecracker, destroy_leftovers, launch_spec

DISKS = (("rootfs", False, True), ("data", False, False), ("seed", True, False))
SAVE = [("GET", "/"), ("PATCH", "/vm"), ("PUT", "/snapshot/create"), ("PATCH", "/vm")]
LOAD = [("GET", "/"), ("PUT", "/logger"), ("PUT", "/metrics"), ("PUT", "/snapshot/load")]
SNAPSHOT_FILES = {VMSTATE, MEM_FILE, MANIFEST, "disk-rootfs.img", "disk-data.img"}


@pytest.fixture(scope="module")
def contract() -> Contract:
    return Contract()


@pytest.fixture
def root() -> Iterator[Path]:
    """A short directory: the double binds its API socket at a host path inside the jail, and
    AF_UNIX paths are limited to 108 bytes (the real jailer chroots first)."""
    path = Path(tempfile.mkdtemp(prefix="fcsnap-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake(root: Path) -> FakeFirecracker:
    return FakeFirecracker.install(root / "bin")


@pytest.fixture
async def backend(fake: FakeFirecracker, root: Path) -> AsyncIterator[FirecrackerBackend]:
    made = jailed_backend(fake, root)
    yield made
    await made.close()
    await destroy_leftovers(root)


def jailed_backend(fake: FakeFirecracker, root: Path) -> FirecrackerBackend:
    return fake.backend(root, jailed=True, reboot_timeout=0.5)


def source_spec(root: Path) -> LaunchSpec:
    nic = NicSpec("eth0", "tap-src", "02:00:00:00:00:01")
    return launch_spec(root, "vm_src", disks=DISKS, nics=(nic,))


def clone_spec(root: Path, snapshot_dir: Path, vm_id: str = "vm_clone-1") -> LaunchSpec:
    nic = NicSpec("eth0", f"tap-{vm_id[-1]}", "02:00:00:00:00:02")
    base = launch_spec(root, vm_id, disks=DISKS, nics=(nic,))
    return dataclasses.replace(base, restore_from=snapshot_dir)


def drive_copy(backend: FirecrackerBackend, spec: LaunchSpec, device_id: str) -> Path:
    return backend._layout(spec.vm_id, spec.vm_dir).host(f"drive-{device_id}.img")


def guest_writes(drive: Path, data: bytes) -> None:
    """What a guest's write reaches: the drive file, at its start."""
    fd = os.open(drive, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def fits(contract: Contract, requests: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(method, path) of each request, after checking each fits the spec and was accepted."""
    for r in requests:
        assert contract.errors(r["method"], r["path"], r["body"]) == [], r
        assert r["status"] in (200, 204), r
    return [(r["method"], r["path"]) for r in requests]


async def snapshotted(
    backend: FirecrackerBackend, fake: FakeFirecracker, root: Path, *, pause: bool = False
) -> tuple[LaunchSpec, Path]:
    spec = source_spec(root)
    await backend.prepare(spec)
    await backend.start(spec)
    assert await backend.wait_ready(spec.vm_id, 10)
    guest_writes(drive_copy(backend, spec, "data"), b"written before the snapshot")
    if pause:
        await backend.pause(spec.vm_id)
    fake.clear()
    dest = root / "snapshots" / "snap_1"
    dest.parent.mkdir()
    result = await backend.snapshot(spec.vm_id, dest)
    assert result.size_bytes > 0 and result.paused_seconds >= 0
    return spec, dest


async def test_a_running_vm_is_paused_saved_and_resumed(
    backend: FirecrackerBackend, fake: FakeFirecracker, contract: Contract, root: Path
) -> None:
    spec, dest = await snapshotted(backend, fake, root)
    requests = fake.requests()
    assert fits(contract, requests) == SAVE
    assert [requests[1]["body"], requests[3]["body"]] == [{"state": "Paused"}, {"state": "Resumed"}]
    assert requests[2]["body"] == {
        "snapshot_type": "Full",
        "snapshot_path": "/vmstate",
        "mem_file_path": "/mem",
    }
    assert {p.name for p in dest.iterdir()} == SNAPSHOT_FILES
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o400 for p in dest.iterdir())  # frozen
    assert (dest / "disk-data.img").read_bytes().startswith(b"written before the snapshot")
    assert json.loads((dest / MANIFEST).read_text())["guest_ready"] is True
    # The source runs on; nothing of the save is left in its jail.
    runtime = await backend.runtime(spec.vm_id)
    assert runtime is not None and not runtime.paused
    jail = backend._layout(spec.vm_id, spec.vm_dir).root
    assert not (jail / VMSTATE).exists() and not (jail / MEM_FILE).exists()


async def test_a_paused_vm_stays_paused(
    backend: FirecrackerBackend, fake: FakeFirecracker, contract: Contract, root: Path
) -> None:
    spec, dest = await snapshotted(backend, fake, root, pause=True)
    assert fits(contract, fake.requests()) == [("GET", "/"), ("PUT", "/snapshot/create")]
    runtime = await backend.runtime(spec.vm_id)
    assert runtime is not None and runtime.paused
    assert {p.name for p in dest.iterdir()} == SNAPSHOT_FILES


async def test_a_clone_loads_into_a_fresh_firecracker_with_its_own_disks_and_taps(
    backend: FirecrackerBackend, fake: FakeFirecracker, contract: Contract, root: Path
) -> None:
    source, dest = await snapshotted(backend, fake, root)
    guest_writes(drive_copy(backend, source, "data"), b"WRITTEN AFTER")  # the source goes on writing
    clone = clone_spec(root, dest)
    await backend.prepare(clone)  # at CreateVm: the clone's drives are copies of the frozen disks
    assert drive_copy(backend, clone, "data").read_bytes().startswith(b"written before the snapshot")
    await backend.destroy(source.vm_id, source.vm_dir)  # the clone needs nothing of its source
    fake.clear()
    runtime = await backend.start(clone)
    requests = fake.requests()
    assert fits(contract, requests) == LOAD
    assert requests[3]["body"] == {
        "snapshot_path": "/vmstate",
        "mem_backend": {"backend_type": "File", "backend_path": "/mem"},
        "resume_vm": True,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap-1"}],
    }
    assert runtime.guest_ready  # the source's guest was up: no new ready line will come
    assert await backend.wait_ready(clone.vm_id, 1)
    assert json.loads((clone.vm_dir / RESTORED).read_text()) == {"guest_ready": True}


async def test_two_clones_of_one_snapshot_and_their_deletion(
    backend: FirecrackerBackend, fake: FakeFirecracker, contract: Contract, root: Path
) -> None:
    _, dest = await snapshotted(backend, fake, root)
    clones = [clone_spec(root, dest, f"vm_clone-{i}") for i in (1, 2)]
    for clone in clones:
        await backend.prepare(clone)
        await backend.start(clone)
    guest_writes(drive_copy(backend, clones[0], "data"), b"clone one's own")
    assert drive_copy(backend, clones[1], "data").read_bytes().startswith(b"written before the snapshot")
    for clone in clones:
        jail = backend._layout(clone.vm_id, clone.vm_dir).root.parent
        await backend.destroy(clone.vm_id, clone.vm_dir)
        assert not clone.vm_dir.exists() and not jail.exists()
    assert {p.name for p in dest.iterdir()} == SNAPSHOT_FILES  # the snapshot keeps its files
    fits(contract, fake.requests())


async def test_a_clone_reboots_and_readopts_cold(
    backend: FirecrackerBackend, fake: FakeFirecracker, contract: Contract, root: Path
) -> None:
    _, dest = await snapshotted(backend, fake, root)
    clone = clone_spec(root, dest)
    await backend.prepare(clone)
    await backend.start(clone)
    # A new daemon re-adopts the restored clone: still up, though no ready line was printed.
    other = jailed_backend(fake, root)
    try:
        runtime = await other.adopt(clone)
        assert runtime is not None and runtime.guest_ready
    finally:
        await other.close()
    fake.clear()
    await backend.reboot(clone.vm_id, force=True)  # Firecracker cannot reset: a cold boot of its disk
    calls = fits(contract, fake.requests())
    assert ("PUT", "/snapshot/load") not in calls and ("PUT", "/boot-source") in calls
    assert not (clone.vm_dir / RESTORED).exists()
    assert await backend.wait_ready(clone.vm_id, 10)  # from the console's ready line this time


async def test_a_memory_file_that_does_not_fit_is_refused_and_nothing_runs(
    backend: FirecrackerBackend, fake: FakeFirecracker, root: Path
) -> None:
    _, dest = await snapshotted(backend, fake, root)
    (dest / MEM_FILE).chmod(0o600)
    os.truncate(dest / MEM_FILE, 4096)
    clone = clone_spec(root, dest)
    await backend.prepare(clone)
    with pytest.raises(MetaldError) as err:
        await backend.start(clone)
    assert err.value.code is ErrorCode.FAILED_PRECONDITION and err.value.reason == "VMM_REFUSED"
    assert await backend.runtime(clone.vm_id) is None


async def test_unjailed_firecracker_says_it_takes_no_snapshots(fake: FakeFirecracker, root: Path) -> None:
    backend = fake.backend(root)
    assert not backend.capabilities.supports_snapshots
    with pytest.raises(MetaldError) as err:
        await backend.snapshot("vm_x", root / "dest")
    assert err.value.code is ErrorCode.FAILED_PRECONDITION
    assert jailed_backend(fake, root).capabilities.supports_snapshots


async def test_a_save_cut_by_the_daemon_s_death_leaves_no_memory_file_in_the_jail(
    backend: FirecrackerBackend, fake: FakeFirecracker, root: Path
) -> None:
    """The daemon died after Firecracker wrote the snapshot into the jail: the next daemon's
    re-adoption removes it (a full copy of guest RAM), and the VM resumes and snapshots again."""
    spec = source_spec(root)
    await backend.prepare(spec)
    await backend.start(spec)
    await backend.pause(spec.vm_id)
    layout = backend._layout(spec.vm_id, spec.vm_dir)
    jail = layout.root
    api = FirecrackerApi(jail, "fc.sock")
    try:
        await api.call(create_call(layout))
    finally:
        await api.aclose()
    assert (jail / MEM_FILE).exists()
    other = jailed_backend(fake, root)
    try:
        runtime = await other.adopt(spec)
        assert runtime is not None and runtime.paused
        assert not (jail / MEM_FILE).exists() and not (jail / VMSTATE).exists()
        await other.resume(spec.vm_id)
        dest = root / "snap_2"
        await other.snapshot(spec.vm_id, dest)
        assert {p.name for p in dest.iterdir()} == SNAPSHOT_FILES
    finally:
        await other.close()
