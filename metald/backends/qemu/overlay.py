"""A VM's directory and its per-VM qcow2 overlays over the shared base images (idempotent).

The base of each overlay is recorded in disks.json when the overlay is made, and that record, not
the overlay's own header (which the VMM can write), says what QEMU is given as the base at every
start. The record names the base's canonical path: the guest image builder never changes a file
once published (it publishes a new version beside it), so an overlay keeps its base for life.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from metald.backends.qemu import layout
from metald.backends.vmm.jsonfile import read_json, write_json_atomic
from metald.backends.vmm.tools import run_tool
from metald.domain.errors import precondition
from metald.ports import LaunchSpec


async def create_overlay(qemu_img: str, base: Path, overlay: Path, *, base_format: str = "raw") -> Path:
    """qcow2 overlay backed by `base`, made under a temporary name (it exists whole or not);
    returns the base's canonical path."""
    tmp = overlay.with_name(overlay.name + ".tmp")
    backing = await asyncio.to_thread(base.resolve)
    argv = [qemu_img, "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(backing), str(tmp)]
    await run_tool(argv, failure=f"cannot create overlay over {base}", reason="OVERLAY_FAILED", partial=tmp)
    await asyncio.to_thread(os.replace, tmp, overlay)
    return backing


def recorded_bases(vm_dir: Path) -> dict[str, str]:
    """Overlay file name -> canonical path of the (raw) base it was made over."""
    return {name: chain[-1] for name, chain in recorded_chains(vm_dir).items()}


def recorded_chains(vm_dir: Path) -> dict[str, list[str]]:
    """Overlay file name -> the images under it, top down: [raw base], or for a clone
    [the snapshot's frozen overlay, raw base]."""
    data = read_json(vm_dir / layout.DISKS_STATE) or {}
    return {str(k): [str(v)] if isinstance(v, str) else [str(x) for x in v] for k, v in data.items()}


def _make_dirs(spec: LaunchSpec) -> None:
    spec.vm_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    spec.console_path.parent.mkdir(parents=True, exist_ok=True)
    spec.console_path.touch(exist_ok=True)


async def prepare_vm_dir(spec: LaunchSpec, *, qemu_img: str) -> None:
    await asyncio.to_thread(_make_dirs, spec)
    bases: dict[str, str | list[str]] = dict(await asyncio.to_thread(recorded_chains, spec.vm_dir))
    for i, disk in enumerate(spec.disks):
        if disk.read_only:
            continue
        overlay = layout.overlay_path(spec.vm_dir, i)
        exists = await asyncio.to_thread(overlay.exists)
        if exists and overlay.name in bases:
            continue
        if exists:
            raise precondition(
                "OVERLAY_BASE_UNKNOWN",
                f"VM {spec.vm_id}: {overlay.name} has no recorded base image (made by an older metald); "
                "recreate the VM",
                vm_id=spec.vm_id,
            )
        if spec.restore_from is not None:  # a clone: over the snapshot's frozen overlay
            frozen = spec.restore_from / overlay.name
            under = (await asyncio.to_thread(recorded_chains, spec.restore_from))[overlay.name]
            made = await create_overlay(qemu_img, frozen, overlay, base_format="qcow2")
            bases[overlay.name] = [str(made), *under]
        else:
            bases[overlay.name] = str(await create_overlay(qemu_img, disk.host_path, overlay))
        await asyncio.to_thread(write_json_atomic, spec.vm_dir / layout.DISKS_STATE, bases)
