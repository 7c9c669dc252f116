"""Where a Firecracker VM's files live: host paths for the daemon, and the paths Firecracker is given.

Unjailed, Firecracker runs with cwd = vm_dir, is given host paths, and its API socket relative to
vm_dir (AF_UNIX paths are limited to 108 bytes; the daemon connects through a directory handle).
Jailed, it sees only its chroot, `<chroot_base>/<exec file name>/<id>/root`: kernel, initrd and
read-only drives are hard-linked (or copied) in before each start, per-VM writable drive copies and
Firecracker's own files live there, and it is given chroot-relative paths. The assets are handed
over open, never by path (assets.py): unjailed, Firecracker is given `inherited` descriptors as
/proc/self/fd/N.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from metald.ports import DiskSpec, LaunchSpec

API_SOCKET = "fc.sock"
VMM_LOG = "firecracker.log"  # Firecracker's own logger (the supervisor's output is vmm.layout.VMM_LOG)
METRICS = "metrics.ndjson"
JAIL_CONSOLE = "console.log"  # jailed only; spec.console_path then links to it
KERNEL = "vmlinux"
INITRD = "initrd"

# Opened by Firecracker without O_APPEND or O_TRUNC, so they are emptied before every start.
FRESH_FILES = (VMM_LOG, METRICS)


def drive_file(disk: DiskSpec) -> str:
    """Name of a drive's per-VM file: the writable copy, or (jailed) the linked read-only image."""
    return f"drive-{disk.device_id}.img"


@dataclass(frozen=True)
class Layout:
    vm_dir: Path
    jail_root: Path | None = None
    # Unjailed: the assets (by host path) Firecracker inherits open, by descriptor number.
    inherited: Mapping[Path, int] = field(default_factory=dict, compare=False)

    @property
    def root(self) -> Path:
        """The directory holding the API socket and Firecracker's files."""
        return self.jail_root or self.vm_dir

    @property
    def api_socket_arg(self) -> str:
        return f"/{API_SOCKET}" if self.jail_root else API_SOCKET

    def host(self, name: str) -> Path:
        return self.root / name

    def vmm(self, name: str) -> str:
        """The path Firecracker is given for one of its own files."""
        return f"/{name}" if self.jail_root else str(self.vm_dir / name)

    def _asset(self, path: Path, jailed_name: str) -> str:
        if self.jail_root:
            return self.vmm(jailed_name)
        fd = self.inherited.get(path)
        return str(path) if fd is None else f"/proc/self/fd/{fd}"

    def kernel(self, spec: LaunchSpec) -> str:
        return self._asset(spec.kernel, KERNEL)

    def initrd(self, spec: LaunchSpec) -> str | None:
        return None if spec.initrd is None else self._asset(spec.initrd, INITRD)

    def drive(self, disk: DiskSpec) -> str:
        if disk.read_only:
            return self._asset(disk.host_path, drive_file(disk))
        return self.vmm(drive_file(disk))

    def console_host(self, spec: LaunchSpec) -> Path:
        return self.host(JAIL_CONSOLE) if self.jail_root else spec.console_path

    def console(self, spec: LaunchSpec) -> str:
        return self.vmm(JAIL_CONSOLE) if self.jail_root else str(spec.console_path)

    def copies(self, spec: LaunchSpec) -> list[tuple[Path, Path]]:
        """(shared image, per-VM copy) for each writable drive: made once, in prepare()."""
        return [(d.host_path, self.host(drive_file(d))) for d in spec.disks if not d.read_only]

    def links(self, spec: LaunchSpec) -> list[tuple[Path, Path]]:
        """(host file, place in the jail) for what a jailed Firecracker reads: renewed at each start."""
        if self.jail_root is None:
            return []
        out = [(spec.kernel, self.host(KERNEL))]
        if spec.initrd is not None:
            out.append((spec.initrd, self.host(INITRD)))
        out += [(d.host_path, self.host(drive_file(d))) for d in spec.disks if d.read_only]
        return out
