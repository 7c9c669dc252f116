"""Firecracker runs under the per-VM supervisor the QEMU backend uses (metald.backends.qemu.process).

Only re-attachment differs: a supervised process is recognised as this VM's Firecracker by its
`--id` (the jailer execs Firecracker in place, so the pid is the same jailed or not).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from metald.backends import procfs
from metald.backends.firecracker.launch import is_firecracker_of
from metald.backends.qemu import layout as supervisor_files
from metald.backends.qemu.process import VmmIdentity, VmmProcess, VmmStartError

__all__ = ["VmmProcess", "VmmStartError", "attach"]


def _identity(vm_dir: Path) -> VmmIdentity | None:
    try:
        state = json.loads((vm_dir / supervisor_files.VMM_STATE).read_text())
        return VmmIdentity(**{k: int(state[k]) for k in VmmIdentity.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


async def attach(vm_dir: Path, fc_id: str) -> VmmProcess | None:
    """The live supervised Firecracker recorded in vm_dir if it is this VM's, else None."""
    ident = await asyncio.to_thread(_identity, vm_dir)
    if ident is None:
        return None
    vmm = VmmProcess._open(vm_dir, ident)  # pidfds first, then identity checks: no pid-reuse window
    if vmm is not None and not is_firecracker_of(procfs.read_cmdline(ident.pid), fc_id):
        vmm.detach()
        return None
    return vmm
