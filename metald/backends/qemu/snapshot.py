"""Snapshots of running QEMU VMs and clones restored from them (measured in shared/lab/snapshots.md).

Every VM runs with its RAM in a file of its own (memory-backend-file share=on, an unnamed tmpfs
file), so a snapshot never streams RAM through the migration channel: with the VM stopped, QEMU
writes only its device state (`x-ignore-shared`, ~66 KB), the daemon copies the allocated parts of
the RAM file and each writable overlay, and the VM continues. RAM, device state and disks are thus
taken at one stop. A clone maps the snapshot's RAM file copy-on-write (share=off), gets overlays
over the snapshot's frozen ones, and loads the device state with `migrate-incoming`.

A snapshot directory holds: `ram`, `state` and one frozen `disk<i>.qcow2` per writable disk (the
source VM's overlays as they were, read-only from then on) with `disks.json` naming their bases.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metald.backends.qemu.control import Qmp
from metald.backends.qemu.layout import DISKS_STATE
from metald.backends.qemu.overlay import recorded_chains
from metald.backends.qemu.qmp import QmpClient, QmpClosedError, QmpError
from metald.backends.vmm.jsonfile import write_json_atomic
from metald.backends.vmm.lifecycle import RunningVm, vmm_failed
from metald.domain.errors import snapshot_unsupported
from metald.ports import SnapshotResult

RAM_FILE = "ram"
DEVICE_STATE = "state"
MANIFEST = "snapshot.json"  # what the restore needs to know of the source: was its guest up
MIGRATION_POLL = 0.002
MIGRATION_TIMEOUT = 60.0
# QEMU's default migration bandwidth (128 MiB/s) throttles even the save of a stopped VM.
MAX_BANDWIDTH = 100 * 1024**3


class SnapshotError(Exception):
    """QEMU could not save or load the device state."""


@dataclass(frozen=True)
class SaveResult:
    size_bytes: int  # bytes allocated by the snapshot's files
    paused_seconds: float  # how long the guest's vCPUs were stopped for it


def copy_sparse(source: Path | str, dest: Path) -> None:
    """Copy only the allocated extents of `source` (guest RAM is mostly holes) into the page
    cache; blocking. Not synced: `sync_files` does that once the guest runs again."""
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(src).st_size
            os.ftruncate(dst, size)
            offset = 0
            while offset < size:
                try:
                    data = os.lseek(src, offset, os.SEEK_DATA)
                except OSError:  # ENXIO: only a hole is left
                    break
                hole = os.lseek(src, data, os.SEEK_HOLE)
                _copy_range(src, dst, data, hole - data)
                offset = hole
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    os.lseek(dst, offset, os.SEEK_SET)
    while length > 0:
        sent = os.sendfile(dst, src, offset, length)  # copy_file_range fails across filesystems
        if sent == 0:
            break
        offset += sent
        length -= sent


def _copy_file(source: Path, dest: Path) -> None:
    shutil.copyfile(source, dest)


def sync_files(directory: Path) -> None:
    """fsync every file of `directory`, then the directory (~120 ms for a 90 MB RAM copy here:
    kept out of the guest's pause, done before the snapshot is renamed into place)."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def allocated_bytes(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.iterdir() if p.is_file())


async def _migration_done(qmp: QmpClient) -> None:
    deadline = time.monotonic() + MIGRATION_TIMEOUT
    while True:
        info: dict[str, Any] = await qmp.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise SnapshotError(f"migration {status}: {info.get('error-desc', '')}")
        if time.monotonic() > deadline:
            raise SnapshotError(f"migration still {status} after {MIGRATION_TIMEOUT:g}s")
        await asyncio.sleep(MIGRATION_POLL)


async def _ignore_shared(qmp: QmpClient) -> None:
    await qmp.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
    )


async def save(
    qmp: QmpClient, *, ram: Path, overlays: Sequence[Path], dest: Path, resume: bool
) -> SaveResult:
    """Stop the VM, write device state + RAM + frozen overlays into `dest` (made here), then
    continue the VM if `resume` (it was running). `ram` is the VM's RAM file (/proc/PID/fd/N)."""
    await asyncio.to_thread(dest.mkdir, mode=0o700)
    # What needs no stopped VM is done before the stop: the pause is the save and the copies only.
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
    await _ignore_shared(qmp)
    fd = await asyncio.to_thread(
        os.open, dest / DEVICE_STATE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
    )
    try:
        await qmp.execute_with_fd("getfd", {"fdname": "snapshot"}, fd)
    finally:
        os.close(fd)
    stopped = time.monotonic()
    await qmp.execute("stop")
    # Once `stop` has answered, vCPUs are stopped and block I/O drained: nothing writes guest RAM
    # any more, so its copy runs beside the device state's save (each in a thread: 2 cores here).
    copies = [asyncio.ensure_future(asyncio.to_thread(copy_sparse, ram, dest / RAM_FILE))]
    try:
        try:
            await qmp.execute("migrate", {"uri": "fd:snapshot"})
            await _migration_done(qmp)
            # The completed migration flushed and inactivated the disks: the overlays are consistent.
            copies += [
                asyncio.ensure_future(asyncio.to_thread(_copy_file, o, dest / o.name)) for o in overlays
            ]
        finally:
            await asyncio.wait(copies)  # every copy has ended before the guest runs again
            errors = [c.exception() for c in copies]
        for failed in errors:
            if failed is not None:
                raise failed
    finally:
        # `cont` also re-activates the disks the migration handed off. A VM that was paused is
        # stopped again at once: QEMU has no way back from "postmigrate" to "paused", and a VM left
        # in "postmigrate" could take no second snapshot.
        await qmp.execute("cont")
        if not resume:
            await qmp.execute("stop")
    paused = time.monotonic() - stopped
    await asyncio.to_thread(sync_files, dest)
    await asyncio.to_thread(_freeze, dest)
    return SaveResult(await asyncio.to_thread(allocated_bytes, dest), paused)


def _freeze(dest: Path) -> None:
    for path in dest.iterdir():
        if path.name != RAM_FILE:  # QEMU 7.2 maps RAM files read-write even copy-on-write
            path.chmod(0o400)


async def restore(qmp: QmpClient, state_fd: int) -> None:
    """Load the device state into a QEMU started with `-incoming defer`; the guest then runs.
    `state_fd` is the state file's descriptor as QEMU sees it (inherited at start)."""
    await _ignore_shared(qmp)
    await qmp.execute("migrate-incoming", {"uri": f"fd:{state_fd}"})
    await _migration_done(qmp)
    status: dict[str, Any] = await qmp.execute("query-status")
    if status.get("status") != "running":
        await qmp.execute("cont")


async def take(
    qmp: QmpClient,
    *,
    ram: Path,
    vm_dir: Path,
    dest: Path,
    resume: bool,
    guest_ready: bool,
    ram_owner: int | None,
) -> SaveResult:
    """`save` a VM whose overlays (and their bases) vm_dir/disks.json names, then record what a
    restore needs beside the files: the overlays' chains and whether the guest was up."""
    chains = await asyncio.to_thread(recorded_chains, vm_dir)
    saved = await save(
        qmp, ram=ram, overlays=[vm_dir / name for name in sorted(chains)], dest=dest, resume=resume
    )
    await asyncio.to_thread(write_json_atomic, dest / DISKS_STATE, chains)
    await asyncio.to_thread(write_json_atomic, dest / MANIFEST, {"guest_ready": guest_ready})
    if ram_owner is not None:  # clones' QEMUs reopen it as the VMM user
        await asyncio.to_thread(os.chown, dest / RAM_FILE, ram_owner, -1)
    return saved


def source_was_ready(snapshot_dir: Path) -> bool:
    try:
        return bool(json.loads((snapshot_dir / MANIFEST).read_text()).get("guest_ready"))
    except (OSError, ValueError):
        return False


async def take_vm(vm: RunningVm[Qmp], dest: Path, *, ram_owner: int | None) -> SnapshotResult:
    """`take` a snapshot of a running or paused VM started with its RAM in a file."""
    if vm.control.ram_fd is None or vm.control.client is None:
        message = f"VM {vm.vm_id} was started without its RAM in a file; shut it down and boot it again"
        raise snapshot_unsupported(vm.vm_id, message)
    status = await vm.control.execute("query-status")
    try:
        saved = await take(
            vm.control.client,
            ram=Path(f"/proc/{vm.vmm.pid}/fd/{vm.control.ram_fd}"),
            vm_dir=vm.vm_dir,
            dest=dest,
            resume=status.get("status") == "running",
            guest_ready=await vm.watch.poll(),
            ram_owner=ram_owner,
        )
    except (SnapshotError, QmpError, QmpClosedError, TimeoutError) as e:
        raise vmm_failed(vm.vm_id, f"snapshot failed: {e}") from e
    return SnapshotResult(saved.size_bytes, saved.paused_seconds)
