"""Snapshots of jailed Firecracker VMs and clones restored from them (docs/snapshots.md).

Taking one: `PATCH /vm` Paused (a paused VM already is), `PUT /snapshot/create` (a Full snapshot:
Firecracker writes the device state and all guest memory into its jail), then, still paused, a
sparse (reflink where possible) copy of each writable drive, then `PATCH /vm` Resumed if it was
running. RAM, device state and disks are thus taken at one stop. The files are moved from the jail
into the snapshot directory, which then holds `vmstate`, `mem`, one frozen `disk-<id>.img` per
writable drive and `snapshot.json` (the manifest: whether the guest was up, which disks).

Restoring a clone: its writable drives are copies of the frozen disks (Firecracker has no qcow2),
`vmstate` and `mem` are linked into its fresh jail, and a fresh Firecracker gets only the logger and
metrics before `PUT /snapshot/load` (mem_backend File, the clone's TAPs as network_overrides,
resume_vm). Firecracker reopens the drives at the paths the device state recorded; jailed, those
are chroot-relative (`/drive-<id>.img`) and so are the clone's own copies. Unjailed they would be
the source's host paths, which is why only a jailed Firecracker takes snapshots.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from metald.backends.firecracker import files
from metald.backends.firecracker.api import ApiCall, FirecrackerApi
from metald.backends.firecracker.layout import Layout, drive_file
from metald.backends.vmm.jsonfile import read_json, write_json_atomic
from metald.ports import DiskSpec, LaunchSpec, SnapshotResult

VMSTATE = "vmstate"  # the same names in the source's jail, the snapshot directory and a clone's jail
MEM_FILE = "mem"
MANIFEST = "snapshot.json"
RESTORED = "restored.json"  # in a clone's vm_dir while it runs restored: was its guest up
PAUSE = ApiCall("PATCH", "/vm", {"state": "Paused"})
RESUME = ApiCall("PATCH", "/vm", {"state": "Resumed"})


def frozen_disk(disk: DiskSpec) -> str:
    return f"disk-{disk.device_id}.img"


def create_call(layout: Layout) -> ApiCall:
    return ApiCall(
        "PUT",
        "/snapshot/create",
        {
            "snapshot_type": "Full",
            "snapshot_path": layout.vmm(VMSTATE),
            "mem_file_path": layout.vmm(MEM_FILE),
        },
    )


def load_call(spec: LaunchSpec, layout: Layout) -> ApiCall:
    """Load into a fresh Firecracker and run: the clone's own TAPs replace the source's."""
    body: dict[str, object] = {
        "snapshot_path": layout.vmm(VMSTATE),
        "mem_backend": {"backend_type": "File", "backend_path": layout.vmm(MEM_FILE)},
        "resume_vm": True,
    }
    if spec.nics:
        body["network_overrides"] = [
            {"iface_id": nic.interface_id, "host_dev_name": nic.tap_device} for nic in spec.nics
        ]
    return ApiCall("PUT", "/snapshot/load", body)


def disk_sources(spec: LaunchSpec, layout: Layout) -> list[tuple[Path, Path]]:
    """(image, per-VM copy) for each writable drive: a clone's are its snapshot's frozen disks."""
    if spec.restore_from is None:
        return layout.copies(spec)
    return [(spec.restore_from / frozen_disk(d), layout.host(drive_file(d))) for d in _writable(spec)]


def _writable(spec: LaunchSpec) -> list[DiskSpec]:
    return [d for d in spec.disks if not d.read_only]


async def take(
    api: FirecrackerApi,
    spec: LaunchSpec,
    layout: Layout,
    dest: Path,
    *,
    running: bool,
    guest_ready: bool,
) -> SnapshotResult:
    """Snapshot the VM into `dest` (made here); it ends running if it was (see the module doc)."""
    await asyncio.to_thread(dest.mkdir, mode=0o700)
    await asyncio.to_thread(_remove_saved, layout)
    try:
        stopped = time.monotonic()
        if running:
            await api.call(PAUSE)
        try:
            await api.call(create_call(layout))
            for disk in _writable(spec):  # written through (Firecracker caches nothing): consistent
                await files.sparse_copy(layout.host(drive_file(disk)), dest / frozen_disk(disk))
        finally:
            if running:
                await api.call(RESUME)
        paused = time.monotonic() - stopped
        for name in (VMSTATE, MEM_FILE):
            await files.move(layout.host(name), dest / name)
    finally:
        await asyncio.to_thread(_remove_saved, layout)  # the service removes `dest` on failure
    manifest = {
        "backend": "firecracker",
        "guest_ready": guest_ready,
        "disks": [frozen_disk(d) for d in _writable(spec)],
    }
    await asyncio.to_thread(write_json_atomic, dest / MANIFEST, manifest)
    await asyncio.to_thread(_freeze, dest)
    return SnapshotResult(await asyncio.to_thread(_allocated, dest), paused)


def _remove_saved(layout: Layout) -> None:
    for name in (VMSTATE, MEM_FILE):
        files.remove(layout.host(name))


def _freeze(dest: Path) -> None:
    for path in dest.iterdir():
        path.chmod(0o400)  # owners keep theirs: a clone's jailed Firecracker reads vmstate and mem


def _allocated(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.iterdir() if p.is_file())


async def lay_out_restore(snapshot_dir: Path, layout: Layout, uid: int | None, gid: int | None) -> bool:
    """Link the device state and memory into the clone's jail; whether the source's guest was up."""
    manifest = await asyncio.to_thread(read_json, snapshot_dir / MANIFEST)
    if manifest is None or manifest.get("backend") != "firecracker":
        raise FileNotFoundError(f"{snapshot_dir / MANIFEST} is not a Firecracker snapshot's manifest")
    for name in (VMSTATE, MEM_FILE):
        await files.link_or_copy(snapshot_dir / name, layout.host(name))
        await asyncio.to_thread(files.chown, layout.host(name), uid, gid)
    ready = bool(manifest.get("guest_ready"))
    await asyncio.to_thread(write_json_atomic, layout.vm_dir / RESTORED, {"guest_ready": ready})
    return ready


def forget_restore(layout: Layout) -> None:
    """Before a cold boot: the clone no longer runs its snapshot's memory."""
    files.remove(layout.vm_dir / RESTORED)
    _remove_saved(layout)


def readopted(layout: Layout) -> bool:
    """At re-adoption: whether the guest was restored up (it prints no new ready line). A save the
    daemon's death cut short may have left a full copy of guest RAM in the jail: it goes (a
    restored clone's link to its memory file may go too: Firecracker keeps its mapping)."""
    _remove_saved(layout)
    return bool((read_json(layout.vm_dir / RESTORED) or {}).get("guest_ready"))
