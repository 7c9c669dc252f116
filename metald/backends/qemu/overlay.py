"""A VM's directory and its per-VM qcow2 overlays over the shared base images (idempotent)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from metald.backends.qemu import layout
from metald.backends.qemu.cmdline import ordered_disks
from metald.domain.errors import ErrorCode, MetaldError
from metald.ports import LaunchSpec


async def create_overlay(qemu_img: str, base: Path, overlay: Path) -> None:
    """qcow2 overlay backed by the raw `base`; made under a temporary name, so it exists whole or not."""
    if await asyncio.to_thread(overlay.exists):
        return
    tmp = overlay.with_name(overlay.name + ".tmp")
    backing = await asyncio.to_thread(base.resolve)
    proc = await asyncio.create_subprocess_exec(
        qemu_img,
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        str(backing),
        str(tmp),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise MetaldError(
            ErrorCode.INTERNAL,
            f"cannot create overlay over {base}: {out.decode(errors='replace').strip()}",
            reason="OVERLAY_FAILED",
        )
    await asyncio.to_thread(os.replace, tmp, overlay)


def _make_dirs(spec: LaunchSpec) -> None:
    spec.vm_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    spec.console_path.parent.mkdir(parents=True, exist_ok=True)
    spec.console_path.touch(exist_ok=True)


def _hand_over(spec: LaunchSpec, uid: int | None, gid: int | None) -> None:
    """Let an unprivileged VMM user write its directory, overlays and console."""
    paths = [spec.vm_dir, spec.console_path, *spec.vm_dir.iterdir()]
    for path in paths:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)


async def prepare_vm_dir(spec: LaunchSpec, *, qemu_img: str, uid: int | None, gid: int | None) -> None:
    await asyncio.to_thread(_make_dirs, spec)
    for i, disk in enumerate(ordered_disks(spec.disks)):
        if not disk.read_only:
            await create_overlay(qemu_img, disk.host_path, layout.overlay_path(spec.vm_dir, i))
    if uid is not None or gid is not None:
        await asyncio.to_thread(_hand_over, spec, uid, gid)
