"""Per-VM cgroups: memory, CPU and pids limits derived from the VM's config.

Limits (vmm_limits): memory = guest RAM + VMM_MEMORY_OVERHEAD, swap included where the host
accounts it (the VMM's own heap, the TCG translation cache, device buffers and the page cache of
images it reads all count); CPU = vCPUs x 100 % of a core (CFS quota per 100 ms period: a guest
can never take more host CPU than it has vCPUs); pids = VMM_PIDS_BASE + vCPUs (threads count too:
vCPU threads, up to 64 block-I/O workers, a few service threads). Firecracker's jailer is given the
same limits (metald.backends.firecracker.launch).

Hierarchy: cgroup v2 where the host has the memory, cpu and pids controllers on it (the unified
hierarchy at the cgroup root, or at <root>/unified in hybrid mode), else v1 (one hierarchy per
controller). A VM's cgroup is <parent>/<name> in each hierarchy. The daemon creates it before the
VMM starts; the supervisor moves the VMM into it before exec, reads its OOM-kill count after
reaping the VMM and removes it; the daemon removes it again on destroy (after a crash), and at
start-up removes every empty one that a killed supervisor left behind (remove_stale).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

MIB = 1024 * 1024
CPU_PERIOD_US = 100_000
VMM_MEMORY_OVERHEAD = 256 * MIB
VMM_PIDS_BASE = 128
CONTROLLERS = ("memory", "cpu", "pids")
DEFAULT_PARENT = "metald"
_REMOVE_WAIT = 2.0
STALE_AGE = 60.0  # a younger empty cgroup may be one whose VMM is being started


class VmmLimits(NamedTuple):  # not dataclasses: see vmm/supervisor.py on its start
    memory_bytes: int
    cpu_quota_us: int  # per CPU_PERIOD_US, the one CFS period every VMM runs with
    pids: int


def vmm_limits(vcpu_count: int, memory_bytes: int, overhead: int = VMM_MEMORY_OVERHEAD) -> VmmLimits:
    """The limits of one VM's VMM (see the module docstring)."""
    return VmmLimits(
        memory_bytes=memory_bytes + overhead,
        cpu_quota_us=vcpu_count * CPU_PERIOD_US,
        pids=VMM_PIDS_BASE + vcpu_count,
    )


def limit_files(version: int, limits: VmmLimits) -> list[tuple[str, str]]:
    """(cgroup file, value) pairs that set `limits`, in writing order."""
    if version == 2:
        return [
            ("cpu.max", f"{limits.cpu_quota_us} {CPU_PERIOD_US}"),
            ("memory.max", str(limits.memory_bytes)),
            ("pids.max", str(limits.pids)),
        ]
    if version == 1:
        return [
            ("cpu.cfs_period_us", str(CPU_PERIOD_US)),
            ("cpu.cfs_quota_us", str(limits.cpu_quota_us)),
            ("memory.limit_in_bytes", str(limits.memory_bytes)),
            ("pids.max", str(limits.pids)),
        ]
    raise ValueError(f"cgroup version must be 1 or 2, not {version}")


def _swap_file(version: int, limits: VmmLimits) -> tuple[str, str]:
    """No swapping past the memory limit (written only where the host accounts swap)."""
    if version == 2:
        return "memory.swap.max", "0"
    return "memory.memsw.limit_in_bytes", str(limits.memory_bytes)


def cgroup_name(vm_id: str, vm_dir: Path) -> str:
    """`<vm_id>-<hash of vm_dir>`: daemons with different data dirs (tests) never share a cgroup."""
    import hashlib  # here: the supervisor imports this module, and its start is on every VM's clock

    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", vm_id)[:64]
    return f"{safe}-{hashlib.sha256(str(vm_dir).encode()).hexdigest()[:8]}"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _is_v1_hierarchy(path: Path) -> bool:
    return (path / "cgroup.procs").exists() and not (path / "cgroup.controllers").exists()


class Cgroups(NamedTuple):
    """Where VMM cgroups are made: controller -> mounted hierarchy root, and the parent in it."""

    version: int
    mounts: Mapping[str, Path]
    parent: str = DEFAULT_PARENT

    @classmethod
    def detect(cls, root: Path, parent: str = DEFAULT_PARENT) -> Cgroups | None:
        """v2 if it has all controllers, else v1 if each is mounted; None if neither is usable (or
        writable: a daemon that is not root runs its VMMs without limits)."""
        found: Cgroups | None = None
        for unified in (root, root / "unified"):
            if set(CONTROLLERS) <= set(_read(unified / "cgroup.controllers").split()):
                found = cls(2, dict.fromkeys(CONTROLLERS, unified), parent)
                break
        mounts = {c: root / c for c in CONTROLLERS}
        if found is None and all(_is_v1_hierarchy(m) for m in mounts.values()):
            found = cls(1, mounts, parent)
        if found is None or not all(os.access(m, os.W_OK) for m in found.mounts.values()):
            return None
        return found

    def dirs(self, name: str) -> list[Path]:
        return list(dict.fromkeys(mount / self.parent / name for mount in self.mounts.values()))

    def create(self, name: str, limits: VmmLimits) -> list[Path]:
        """The VM's cgroup with `limits` set (an existing one is reused); returns its directories."""
        if self.version == 2:
            self._enable_controllers()
        for directory in self.dirs(name):
            directory.mkdir(parents=True, exist_ok=True)
        swap, value = _swap_file(self.version, limits)
        for file, content in limit_files(self.version, limits):
            (self.mounts[file.split(".")[0]] / self.parent / name / file).write_text(content)
        if (path := self.mounts["memory"] / self.parent / name / swap).exists():
            path.write_text(value)
        self._weigh_parent()
        return self.dirs(name)

    def _weigh_parent(self) -> None:
        """Give the parent the CPU weight of as many processes as it holds VMs: at the default
        weight, all VMs together would get no more CPU under contention than one host process."""
        parent = self.mounts["cpu"] / self.parent
        vms = max(1, sum(1 for child in parent.iterdir() if child.is_dir()))
        if self.version == 2:
            (parent / "cpu.weight").write_text(str(min(100 * vms, 10_000)))
        else:
            (parent / "cpu.shares").write_text(str(min(1024 * vms, 262_144)))

    def _enable_controllers(self) -> None:
        """v2: a cgroup offers its children the controllers enabled in its cgroup.subtree_control."""
        level = self.mounts["memory"]
        levels = [level]
        for part in Path(self.parent).parts:
            level = level / part
            levels.append(level)
        for level in levels:
            level.mkdir(exist_ok=True)
            (level / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))

    def remove_stale(self, min_age: float = STALE_AGE) -> list[Path]:
        """Remove the VM cgroups without processes older than `min_age` seconds: those whose
        supervisor was killed before it could (a cgroup with a process cannot be removed)."""
        removed = []
        for mount in dict.fromkeys(self.mounts.values()):
            parent = mount / self.parent
            children = [d for d in parent.iterdir() if d.is_dir()] if parent.is_dir() else []
            for child in children:
                if time.time() - child.stat().st_mtime < min_age or _read(child / "cgroup.procs").strip():
                    continue
                with contextlib.suppress(OSError):
                    child.rmdir()
                    removed.append(child)
        return removed


def oom_kills(dirs: Iterable[Path]) -> int:
    """How many processes the kernel OOM-killed in this cgroup (v2 memory.events, v1 memory.oom_control)."""
    for directory in dirs:
        for name in ("memory.events", "memory.oom_control"):
            for line in _read(directory / name).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return 0


def remove_dirs(dirs: Iterable[Path]) -> None:
    """rmdir each cgroup, waiting briefly for a process that is still exiting to leave it."""
    deadline = time.monotonic() + _REMOVE_WAIT
    for directory in dirs:
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)
