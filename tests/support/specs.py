"""LaunchSpecs for tests that drive a backend (or its builders) without the service."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metald.ports import DiskSpec, LaunchSpec


def bare_spec(
    vm_id: str, vm_dir: Path, kernel: Path, disks: Sequence[DiskSpec], **changes: Any
) -> LaunchSpec:
    """One vCPU and 256 MiB booting `kernel` over `disks`; no initrd, CPU template, kernel args,
    NICs or namespace; a serial console into vm_dir/console.log. `changes`: any field otherwise."""
    spec = LaunchSpec(
        vm_id=vm_id,
        vm_dir=vm_dir,
        vcpu_count=1,
        memory_bytes=256 << 20,
        cpu_template="",
        kernel=kernel,
        initrd=None,
        customer_kernel_args="",
        guest_kernel_args="",
        disks=tuple(disks),
        nics=(),
        netns=None,
        console_type="SERIAL",
        console_path=vm_dir / "console.log",
    )
    return dataclasses.replace(spec, **changes)
