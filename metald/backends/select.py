"""Which backend runs the VMs: `backend = qemu | firecracker | auto`.

`auto` picks Firecracker only where it can really run: its binary is there and KVM works. The KVM
probe here is the cheap one Firecracker itself depends on (open /dev/kvm, KVM_GET_API_VERSION == 12,
KVM_CREATE_VM succeeds). It cannot see a KVM that creates VMs but fails to run them (nested PVM on
this kind of host): proving that needs a full guest boot, which is the QEMU backend's accel probe.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
from collections.abc import Awaitable, Callable

KVM_DEVICE = "/dev/kvm"
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01)
KVM_API_VERSION = 12


def _probe_kvm(device: str) -> bool:
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION:
            return False
        os.close(fcntl.ioctl(fd, KVM_CREATE_VM, 0))  # returns the new VM's fd
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


async def kvm_usable(device: str = KVM_DEVICE) -> bool:
    """True if `device` is a KVM of the stable API that lets this process create a VM."""
    return await asyncio.to_thread(_probe_kvm, device)


async def choose_backend_type(
    setting: str, firecracker_binary: str, kvm_usable: Callable[[], Awaitable[bool]]
) -> str:
    """ "qemu" or "firecracker". An explicit choice is kept as is (its backend's health check then
    reports what is missing); `auto` falls back to QEMU, which also runs without KVM (TCG)."""
    if setting in ("qemu", "firecracker"):
        return setting
    if setting != "auto":
        raise ValueError(f"backend must be qemu, firecracker or auto, not {setting!r}")
    if shutil.which(firecracker_binary) is None:
        return "qemu"
    return "firecracker" if await kvm_usable() else "qemu"
