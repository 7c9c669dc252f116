"""Builds the configured backend (`backend = qemu | firecracker | auto`) from the settings."""

from __future__ import annotations

import asyncio
import logging

from metald.backends.firecracker.backend import FirecrackerBackend
from metald.backends.qemu.backend import QemuBackend
from metald.backends.select import choose_backend_type, kvm_usable
from metald.backends.vmm.cgroups import Cgroups
from metald.backends.vmm.sandbox import VmmUser, resolve_vmm_user
from metald.ports import Backend
from metald.settings import Settings

log = logging.getLogger("metald.backends")


def vmm_user(settings: Settings) -> VmmUser | None:
    """Who VMMs run as (None: the daemon's own user); resolved once, warning once."""
    return resolve_vmm_user(settings.vmm_user, settings.vmm_uid, settings.vmm_gid)


async def build_backend(settings: Settings) -> Backend:
    backend_type = await choose_backend_type(settings.backend, settings.firecracker_binary, kvm_usable)
    log.info("backend: %s (configured: %s)", backend_type, settings.backend)
    user = vmm_user(settings)
    cgroups = Cgroups.detect(settings.cgroup_root)
    if cgroups is not None and (stale := await asyncio.to_thread(cgroups.remove_stale)):
        log.info("removed %d VM cgroups left by killed supervisors", len(stale))
    if cgroups is None:
        log.warning(
            "no usable cgroup hierarchy with the memory, cpu and pids controllers under %s: "
            "VMMs run WITHOUT memory, CPU and pids limits",
            settings.cgroup_root,
        )
    log.info(
        "VMMs run as %s, cgroup %s",
        "the daemon's own user" if user is None else f"uid {user.uid} gid {user.gid}",
        "none" if cgroups is None else f"v{cgroups.version} under {cgroups.parent}/",
    )
    if backend_type == "firecracker":
        return FirecrackerBackend(
            firecracker_binary=settings.firecracker_binary,
            jailer_binary=settings.jailer_binary,
            chroot_base=settings.jailer_chroot_base,
            vmm_uid=None if user is None else user.uid,
            vmm_gid=None if user is None else user.gid,
            cgroup_version=2 if cgroups is None else cgroups.version,
            cgroup_root=settings.cgroup_root,
            cgroups=cgroups,
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
        vmm_user=user,
        cgroups=cgroups,
        ram_dir=settings.ram_dir,
        console_log_max_bytes=settings.console_log_max_bytes,
    )
