"""The host files of one QEMU VM, opened by the daemon and handed to QEMU as descriptors.

QEMU runs as an unprivileged user that owns nothing on the host and may not even enter vm_dir, so
it neither needs any directory on the way to its files to be open to it nor can it replace a file
the daemon later reads as root (a console log turned into a link to /etc/shadow, say):
- kernel and initrd: /proc/self/fd/N, because QEMU's loaders take a path (reopening through
  /proc checks only the file's own mode: images must be readable by the VMM user, as built ones are);
  assets (kernel, initrd, read-only disks, overlay bases) are opened following no symlink, so one
  swapped in after the daemon checked the path is refused (ASSET_CHANGED);
- disks: the read-only image, or the writable overlay (read-write and read-only) and the base
  recorded when it was made (overlay.py);
- console and serial log: the writing end of a pipe; the VM's supervisor appends what comes out
  to the log file, bounded (vmm/relay.py): a guest printing endlessly cannot fill the disk;
- QMP and agent: sockets bound and listening in vm_dir, for QEMU to accept on;
- NICs: the TAPs in the VM's network namespace, attached to by the daemon. QEMU needs neither
  /dev/net/tun (root-only on some hosts) nor a TAP of its own: root keeps owning every TAP, so the
  VMM user cannot attach to another VM's by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from metald.assets import open_beneath
from metald.backends.qemu import layout
from metald.backends.qemu.cmdline import DiskFds, VmmFds
from metald.backends.qemu.overlay import recorded_chains
from metald.backends.qemu.snapshot import DEVICE_STATE, RAM_FILE
from metald.ports import LaunchSpec

_READ = os.O_RDONLY | os.O_CLOEXEC
NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts named namespaces
_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_TAP_FLAGS = 0x0002 | 0x1000 | 0x4000  # IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, as QEMU asks itself


class VmmFileError(Exception):
    """A file of the VM cannot be opened; nothing was left open."""


class _Opener:
    def __init__(self) -> None:
        self.fds: list[int] = []

    def file(self, path: Path | str, flags: int) -> int:
        try:
            fd = os.open(path, flags, 0o640)
        except OSError as e:
            raise VmmFileError(f"cannot open {path}: {e.strerror}") from e
        self.fds.append(fd)
        return fd

    def asset(self, path: Path, root: Path | None) -> int:
        """A resolved asset, read-only; under `root` (the spec's canonical assets root) following no
        symlink, so one swapped in since it was checked is ASSET_CHANGED, never handed to QEMU."""
        if root is None or not path.is_relative_to(root):
            return self.file(path, _READ)  # a spec built by hand, or a base outside today's root
        try:
            fd = open_beneath(root, path, os.O_RDONLY)
        except OSError as e:
            raise VmmFileError(f"cannot open {path}: {e.strerror}") from e
        self.fds.append(fd)
        return fd

    def pipe(self) -> tuple[int, int]:
        """(reading end, writing end) of a new pipe: QEMU writes a log into it, the supervisor copies
        it into the bounded file (vmm/relay.py)."""
        read, write = os.pipe2(os.O_CLOEXEC)
        self.fds += [read, write]
        return read, write

    def listener(self, vm_dir: Path, name: str) -> int:
        """A listening socket at vm_dir/name (a stale one is replaced); bound through a directory
        handle, as AF_UNIX paths are limited to 108 bytes."""
        try:
            dir_fd = os.open(vm_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dir_fd)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.bind(f"/proc/self/fd/{dir_fd}/{name}")
                    sock.listen(8)
                    fd = sock.detach()
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise VmmFileError(f"cannot listen on {vm_dir / name}: {e.strerror}") from e
        self.fds.append(fd)
        return fd

    def taps(self, netns: str | None, names: Sequence[str]) -> tuple[int, ...]:
        """Attach to the TAPs `names` of network namespace `netns`, from a thread of their own that
        enters it (a thread's network namespace is its own: no other thread of the daemon moves)."""
        fds: list[int] = []
        failure: list[OSError] = []

        def attach() -> None:
            try:
                if netns:
                    _enter_netns(netns)
                for name in names:
                    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
                    fds.append(fd)
                    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _TAP_FLAGS))
            except OSError as e:
                failure.append(e)

        thread = threading.Thread(target=attach, name=f"taps-{netns}")
        thread.start()
        thread.join()
        self.fds += fds
        if failure:
            raise VmmFileError(f"cannot attach to TAPs {', '.join(names)} in {netns}: {failure[0]}")
        return tuple(fds)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def _enter_netns(netns: str) -> None:
    fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
    finally:
        os.close(fd)


@dataclass(frozen=True)
class RamFile:
    """Where a VM that boots keeps its RAM: an unnamed file in `directory` (tmpfs), given to `owner`
    (the VMM user's uid, None: the daemon's), as QEMU reopens it through /proc/self/fd."""

    directory: Path
    owner: int | None = None


def open_vmm_files(spec: LaunchSpec, ram: RamFile | None = None) -> VmmFds:
    """Open everything QEMU needs for `spec` (blocking: run in a thread). Close with close_fds()."""
    opener = _Opener()
    try:
        chains = recorded_chains(spec.vm_dir)
        disks = []
        for i, disk in enumerate(spec.disks):
            if disk.read_only:
                disks.append(DiskFds((opener.asset(disk.host_path, spec.assets_root),)))
                continue
            overlay = layout.overlay_path(spec.vm_dir, i)
            if overlay.name not in chains:
                raise VmmFileError(f"{overlay.name} has no recorded base image")
            rw = opener.file(overlay, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            ro = opener.file(overlay, _READ | os.O_NOFOLLOW)
            *frozen_paths, base_path = chains[overlay.name]
            frozen = [opener.file(path, _READ) for path in frozen_paths]
            base = opener.asset(Path(base_path), spec.assets_root)
            disks.append(DiskFds((rw, ro), base, tuple(frozen)))
        ram_fd, incoming = _memory_files(opener, spec, ram)
        console_source, console = opener.pipe()
        serial_source, serial = opener.pipe() if spec.console_type == "VIRTIO_CONSOLE" else (None, None)
        return VmmFds(
            kernel=opener.asset(spec.kernel, spec.assets_root),
            initrd=None if spec.initrd is None else opener.asset(spec.initrd, spec.assets_root),
            disks=tuple(disks),
            console=console,
            serial=serial,
            log_sources=(console_source,) if serial_source is None else (console_source, serial_source),
            qmp=opener.listener(spec.vm_dir, layout.QMP_SOCKET),
            agent=opener.listener(spec.vm_dir, layout.AGENT_SOCKET),
            taps=opener.taps(spec.netns, [nic.tap_device for nic in spec.nics]) if spec.nics else (),
            ram=ram_fd,
            incoming=incoming,
        )
    except BaseException:
        opener.close()
        raise


def _memory_files(opener: _Opener, spec: LaunchSpec, ram: RamFile | None) -> tuple[int | None, int | None]:
    """(RAM file, device state to load): a clone's from its snapshot, else a new unnamed RAM file."""
    if spec.restore_from is not None:
        ram_fd = opener.file(spec.restore_from / RAM_FILE, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        return ram_fd, opener.file(spec.restore_from / DEVICE_STATE, _READ | os.O_NOFOLLOW)
    if ram is None:
        return None, None
    try:
        ram.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise VmmFileError(f"cannot make {ram.directory}: {e.strerror}") from e
    fd = opener.file(ram.directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC)
    try:
        if ram.owner is not None:
            os.fchown(fd, ram.owner, -1)
        os.ftruncate(fd, spec.memory_bytes)
    except OSError as e:
        raise VmmFileError(f"cannot size the RAM file in {ram.directory}: {e.strerror}") from e
    return fd, None


def log_paths(spec: LaunchSpec) -> list[Path]:
    """The files the log pipes of VmmFds.log_sources end in, in the same order; relative to vm_dir
    (the supervisor's working directory), so that they follow it if it is renamed (warm pool)."""
    paths = [spec.console_path]
    if spec.console_type == "VIRTIO_CONSOLE":
        paths.append(spec.vm_dir / layout.SERIAL_LOG)
    return [p.relative_to(spec.vm_dir) if p.is_relative_to(spec.vm_dir) else p for p in paths]


def close_fds(fds: VmmFds) -> None:
    for fd in (*fds.all(), *fds.log_sources):
        os.close(fd)
