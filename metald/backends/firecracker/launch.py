"""Firecracker command lines, jailed or not. Pure functions: every host decision is an argument.

Jailer flags follow Firecracker's docs/jailer.md. Deliberately not used:
- `--daemonize`: Firecracker stays the child of its per-VM supervisor, which reaps it and records
  its exit status (the supervisor has its own session, so the VM survives the daemon).
- `--new-pid-ns`: the jailer would fork, and the pid the supervisor waits for would no longer be
  Firecracker's.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from metald.backends.vmm.cgroups import limit_files, vmm_limits
from metald.backends.vmm.sandbox import VmmUser, wrap_argv

_FC_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


def firecracker_id(vm_id: str) -> str:
    """The `--id` for a VM: Firecracker and the jailer accept only [A-Za-z0-9-]{1,64}.

    Valid ids are kept; others (metald ids contain "_") get "-" for each other character and a
    hash suffix, so that two different VM ids never share a Firecracker id or a jail.
    """
    if _FC_ID.fullmatch(vm_id):
        return vm_id
    digest = hashlib.sha256(vm_id.encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9-]", "-", vm_id)[:55] + "-" + digest


def is_firecracker_of(cmdline: Sequence[str], fc_id: str) -> bool:
    """Whether a process command line is the Firecracker (or jailer) started for `fc_id`."""
    return any(
        arg == f"--id={fc_id}" or (arg == "--id" and nxt == fc_id)
        for arg, nxt in zip(cmdline, [*cmdline[1:], ""], strict=True)
    )


def direct_argv(
    *, firecracker: str, fc_id: str, api_sock: str, netns: str | None, user: VmmUser | None
) -> list[str]:
    """Firecracker without the jailer: in the VM's network namespace and as `user` if given."""
    argv = [firecracker, "--id", fc_id, "--api-sock", api_sock]
    return wrap_argv(argv, netns=netns, user=user)


def cgroup_limits(cgroup_version: int, vcpu_count: int, memory_bytes: int) -> list[str]:
    """`--cgroup FILE=VALUE` settings: the limits every VMM gets (metald.backends.vmm.cgroups)."""
    limits = vmm_limits(vcpu_count, memory_bytes)
    return [f"{file}={value}" for file, value in limit_files(cgroup_version, limits)]


def jailer_argv(
    *,
    jailer: str,
    firecracker: str,
    fc_id: str,
    api_sock: str,
    uid: int,
    gid: int,
    chroot_base: Path,
    netns: str | None,
    cgroup_version: int,
    vcpu_count: int,
    memory_bytes: int,
) -> list[str]:
    """The jailer command; it passes `--id` to Firecracker itself, so only the socket follows `--`."""
    argv = [
        jailer,
        "--id",
        fc_id,
        "--exec-file",
        firecracker,
        "--uid",
        str(uid),
        "--gid",
        str(gid),
        "--chroot-base-dir",
        str(chroot_base),
        "--cgroup-version",
        str(cgroup_version),
    ]
    for setting in cgroup_limits(cgroup_version, vcpu_count, memory_bytes):
        argv += ["--cgroup", setting]
    if netns:
        argv += ["--netns", f"/var/run/netns/{netns}"]
    return [*argv, "--", "--api-sock", api_sock]


def jail_dir(chroot_base: Path, firecracker: str, fc_id: str) -> Path:
    """`<chroot_base>/<exec file name>/<id>`: the jailer's directory for one VM (its chroot is `root`)."""
    return chroot_base / os.path.basename(firecracker) / fc_id


def cgroup_dirs(cgroup_root: Path, cgroup_version: int, firecracker: str, fc_id: str) -> list[Path]:
    """The cgroups the jailer creates for a VM (parent cgroup = exec file name); removed on destroy."""
    parent = os.path.basename(firecracker)
    if cgroup_version == 2:
        return [cgroup_root / parent / fc_id]
    return [cgroup_root / controller / parent / fc_id for controller in ("cpu", "memory", "pids")]
