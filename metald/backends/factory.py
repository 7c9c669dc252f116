"""Builds the configured backend (`backend = qemu | firecracker | auto`) from the settings."""

from __future__ import annotations

import logging

from metald.backends.firecracker.backend import FirecrackerBackend
from metald.backends.qemu.backend import QemuBackend
from metald.backends.select import choose_backend_type, kvm_usable
from metald.ports import Backend
from metald.settings import Settings

log = logging.getLogger("metald.backends")


async def build_backend(settings: Settings) -> Backend:
    backend_type = await choose_backend_type(settings.backend, settings.firecracker_binary, kvm_usable)
    log.info("backend: %s (configured: %s)", backend_type, settings.backend)
    if backend_type == "firecracker":
        return FirecrackerBackend(
            firecracker_binary=settings.firecracker_binary,
            jailer_binary=settings.jailer_binary,
            chroot_base=settings.jailer_chroot_base,
            vmm_uid=settings.vmm_uid,
            vmm_gid=settings.vmm_gid,
            cgroup_root=settings.cgroup_root,
        )
    assets = settings.assets_root
    return QemuBackend(
        qemu_binary=settings.qemu_binary,
        qemu_img_binary=settings.qemu_img_binary,
        accel=settings.accel,
        state_dir=settings.data_dir,
        probe_kernel=assets / "vmlinux",
        probe_initrd=assets / "initrd",
        probe_rootfs=assets / "rootfs.ext4",
        vmm_uid=settings.vmm_uid,
        vmm_gid=settings.vmm_gid,
    )
