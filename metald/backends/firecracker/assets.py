"""The assets one Firecracker reads, handed over open, never by path.

Kernel, initrd, read-only drives and the images writable drives are copied from are opened by the
daemon beneath the spec's assets root following no symlink (metald/assets.py:open_beneath), then:
- jailed: hard-linked into the jail from the descriptor (linkat of /proc/self/fd/N with
  AT_SYMLINK_FOLLOW, which needs no CAP_DAC_READ_SEARCH), or copied from it across filesystems;
- unjailed: inherited by Firecracker (through its supervisor), which is given /proc/self/fd/N;
- writable drives: the per-VM copy is read from the descriptor.
All of a step's assets are opened before anything is created, linked, copied or started, so an
asset swapped for a symlink since the service resolved it is FAILED_PRECONDITION ASSET_CHANGED
with nothing left behind (no descriptor, no new jail or VM directory, no link, no process). A spec built by hand (assets_root
None) is opened by path, and, unjailed, given to Firecracker by path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

from metald.assets import open_beneath
from metald.backends.vmm.lifecycle import vmm_failed
from metald.ports import LaunchSpec

_READ = os.O_RDONLY | os.O_CLOEXEC


def handed(spec: LaunchSpec, *, jailed: bool) -> list[Path]:
    """The assets to open for a start, which Firecracker itself reads (kernel, initrd, read-only
    drives): all of them jailed (linked into the jail); unjailed, none for a spec built by hand."""
    if not jailed and spec.assets_root is None:
        return []
    paths = [spec.kernel] if spec.initrd is None else [spec.kernel, spec.initrd]
    return paths + [d.host_path for d in spec.disks if d.read_only]


@contextlib.asynccontextmanager
async def opened(spec: LaunchSpec, paths: Sequence[Path]) -> AsyncIterator[Mapping[Path, int]]:
    """`paths` open read-only (beneath spec.assets_root when under it, else by path), closed on leaving.
    All or none: ASSET_CHANGED (VMM_FAILED for a file that cannot be opened) leaves none open."""
    fds = await asyncio.to_thread(_open_all, spec, paths)
    try:
        yield fds
    finally:
        _close(fds)


def _open_all(spec: LaunchSpec, paths: Sequence[Path]) -> dict[Path, int]:
    fds: dict[Path, int] = {}
    try:
        for path in paths:
            if path not in fds:
                fds[path] = _open(spec, path)
    except BaseException:
        _close(fds)
        raise
    return fds


def _close(fds: Mapping[Path, int]) -> None:
    for fd in fds.values():
        os.close(fd)


def _open(spec: LaunchSpec, path: Path) -> int:
    root = spec.assets_root
    try:
        if root is not None and path.is_relative_to(root):
            return open_beneath(root, path, os.O_RDONLY)
        return os.open(path, _READ)  # a spec built by hand, or a clone's frozen disk (daemon state)
    except OSError as e:
        raise vmm_failed(spec.vm_id, f"cannot open {path}: {e.strerror}") from e


def host_source(fd: int) -> Path:
    """A path to the open file for a tool the daemon runs (cp): its own /proc/PID/fd entry, which
    the tool, a child of the same user, reopens as this very file."""
    return Path(f"/proc/{os.getpid()}/fd/{fd}")


def link(fd: int, dst: Path) -> bool:
    """Hard-link the open file at `dst` (replacing what is there); False where it cannot be
    linked (EXDEV across filesystems, EPERM under protected_hardlinks): copy it then."""
    with contextlib.suppress(FileNotFoundError):
        dst.unlink()
    fd_dir = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(str(fd), dst, src_dir_fd=fd_dir, follow_symlinks=True)
    except OSError:
        return False
    finally:
        os.close(fd_dir)
    return True
