"""Per-VM files: sparse copies of writable images, links into the jail, files emptied before a start."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
from pathlib import Path

from metald.backends.firecracker import assets
from metald.backends.firecracker.layout import API_SOCKET, FRESH_FILES, Layout
from metald.backends.vmm.tools import run_tool
from metald.ports import LaunchSpec


async def sparse_copy(src: Path, dst: Path) -> None:
    """Copy an image without allocating its holes (reflink where the filesystem can).

    Firecracker has no copy-on-write format (no qcow2), so every writable drive is a per-VM copy of
    the shared raw image. The copy is made under a temporary name and renamed: an interrupted copy
    never passes for a finished one. A file already at that name (a stale copy, or a symlink
    planted in a jail the VMM user owns) is removed first, never written through.
    """
    tmp = dst.with_name(dst.name + ".part")
    argv = ["cp", "--reflink=auto", "--sparse=always", "--remove-destination", "--", str(src), str(tmp)]
    await run_tool(argv, failure=f"cannot copy {src} for the VM", reason="DISK_COPY_FAILED", partial=tmp)
    await asyncio.to_thread(os.replace, tmp, dst)


async def place(fd: int, dst: Path) -> None:
    """Put the open file `fd` at `dst` (in a jail): a hard link when on the same filesystem, else a
    sparse copy; from the descriptor, never from a path that could have changed (assets.py)."""
    if not await asyncio.to_thread(assets.link, fd, dst):
        await sparse_copy(assets.host_source(fd), dst)


async def link_or_copy(src: Path, dst: Path) -> None:
    """place() for a file of the daemon's own (a snapshot's), opened by path."""
    fd = await asyncio.to_thread(os.open, src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        await place(fd, dst)
    finally:
        os.close(fd)


def chown(path: Path, uid: int | None, gid: int | None) -> None:
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)


def fresh_file(path: Path, uid: int | None, gid: int | None) -> None:
    """An empty file for the VMM to write: Firecracker opens its outputs without O_APPEND or O_TRUNC."""
    with open(path, "wb"):
        pass
    chown(path, uid, gid)


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def move(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; across filesystems (a jail elsewhere), a sparse copy, then unlink."""
    try:
        await asyncio.to_thread(os.replace, src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        await sparse_copy(src, dst)
        await asyncio.to_thread(remove, src)


def fresh_layout(spec: LaunchSpec, layout: Layout, uid: int | None, gid: int | None) -> None:
    """Before each start: empty output files, no stale socket, (jailed) no stale /dev; blocking."""
    chown(layout.root, uid, gid)  # Firecracker creates its socket there
    remove(layout.host(API_SOCKET))
    for name in FRESH_FILES:
        fresh_file(layout.host(name), uid, gid)
    fresh_file(layout.console_host(spec), uid, gid)
    if layout.jail_root is not None:
        shutil.rmtree(layout.jail_root / "dev", ignore_errors=True)  # the jailer mknods it again
        remove(spec.console_path)
        spec.console_path.symlink_to(layout.console_host(spec))
