"""Maps the customer-visible /assets/ paths onto the host's image directory, refusing escapes, and
opens what was resolved without following any symlink.

A path is opened (O_PATH: no read, no side effects even on a device or FIFO) and judged by what
was actually opened: its canonical path from /proc/self/fd and its fstat. The canonical path,
free of symlinks, is what the backend is given, with the canonical root; the backend opens it with
`open_beneath`, which follows no symlink below the root (each component O_NOFOLLOW under its
parent's descriptor, from the root's), so a canonical file swapped for a symlink after the check
(to a file outside the assets root, say) is refused as ASSET_CHANGED, not handed to the VMM.

A VM's paths are resolved at CreateVm and again at every boot; a kernel must also start like a
kernel image (metald/domain/kernel_image.py). A host out of file descriptors is UNAVAILABLE,
never blamed on the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from metald.domain.errors import ErrorCode, MetaldError, denied, invalid
from metald.domain.kernel_image import KERNEL_HEAD_BYTES, check_kernel_head
from metald.domain.validation import ASSETS_PREFIX

_HOST_LIMITS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)


class AssetResolver:
    def __init__(self, root: Path, *, private: Sequence[Path] = ()) -> None:
        """`private`: path prefixes of the daemon's own state (VM directories, the database) that are
        never an asset, should the assets root be configured to contain them."""
        self.root = root
        self._private = tuple(str(p.resolve()) for p in private)

    async def canonical_root(self) -> Path:
        return await asyncio.to_thread(self.root.resolve)

    async def resolve(self, virtual_path: str, field: str) -> Path:
        """The canonical host path of a regular file under the assets root."""
        return await asyncio.to_thread(self._resolve, virtual_path, field)

    async def resolve_kernel(self, virtual_path: str, field: str, *, accepted: bool = False) -> Path:
        """resolve(), for a file that must also start like a kernel image: KERNEL_INVALID,
        INVALID_ARGUMENT for a request's path, FAILED_PRECONDITION for one `accepted` before
        (a stored VM's, at boot)."""
        code = ErrorCode.FAILED_PRECONDITION if accepted else ErrorCode.INVALID_ARGUMENT
        return await asyncio.to_thread(self._resolve_kernel, virtual_path, field, code)

    def _resolve_kernel(self, virtual_path: str, field: str, code: ErrorCode) -> Path:
        real = self._resolve(virtual_path, field)
        check_kernel_head(_head(self.root.resolve(), real, virtual_path, field), field, code)
        return real

    def _resolve(self, virtual_path: str, field: str) -> Path:
        root = self.root.resolve()
        candidate = root / virtual_path.removeprefix(ASSETS_PREFIX)
        try:
            fd = os.open(candidate, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            if not Path(os.path.realpath(candidate)).is_relative_to(root):
                raise invalid(field, f"{virtual_path} resolves outside {ASSETS_PREFIX}") from None
            raise invalid(field, f"{virtual_path} does not exist") from None
        except OSError as e:
            if e.errno in _HOST_LIMITS:
                raise _host_error(e) from None
            raise invalid(field, f"{virtual_path} cannot be opened") from None
        try:
            real = Path(os.readlink(f"/proc/self/fd/{fd}"))
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not real.is_relative_to(root):
            raise invalid(field, f"{virtual_path} resolves outside {ASSETS_PREFIX}")
        if str(real).startswith(self._private):
            raise denied(
                "PATH_NOT_PERMITTED",
                f"{field}: {virtual_path} is VM state kept by metald, not an asset",
                field=field,
            )
        if not stat.S_ISREG(st.st_mode) or st.st_nlink == 0:
            raise invalid(field, f"{virtual_path} is not a regular file")
        return real


def _head(root: Path, real: Path, virtual_path: str, field: str) -> bytes:
    """The first bytes of a resolved file, opened as the backend will open it."""
    try:
        fd = open_beneath(root, real, os.O_RDONLY)
        try:
            return os.pread(fd, KERNEL_HEAD_BYTES, 0)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno in _HOST_LIMITS:
            raise _host_error(e) from None
        raise invalid(field, f"{virtual_path} cannot be read") from None


def _host_error(e: OSError) -> MetaldError:
    return MetaldError(
        ErrorCode.UNAVAILABLE,
        f"the host cannot open more files right now ({e.strerror}); retry later",
        reason="HOST_RESOURCES_EXHAUSTED",
    )


def asset_changed(path: Path) -> MetaldError:
    return MetaldError(
        ErrorCode.FAILED_PRECONDITION,
        f"asset {path.name} was replaced by a symbolic link after it was checked; not handed to the VMM",
        reason="ASSET_CHANGED",
        metadata={"asset": path.name},
    )


def open_beneath(root: Path, path: Path, flags: int) -> int:
    """Open `path`, a canonical path under the canonical `root` (as resolve() returns them),
    following no symlink below the root: from the root's directory descriptor, every directory is
    opened O_NOFOLLOW under its parent's, and so is the file. A symlink on the way (a canonical
    file or directory swapped for one since it was resolved) raises ASSET_CHANGED; a path not
    under `root`, ValueError. Blocking: run in a thread."""
    parts = path.relative_to(root).parts
    if not parts:
        raise ValueError(f"{path} is the assets root itself")
    dir_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts[:-1]:
            try:
                next_fd = os.open(
                    name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
                )
            except OSError as e:
                raise _open_error(e, dir_fd, name, path) from None
            os.close(dir_fd)
            dir_fd = next_fd
        try:
            return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as e:
            raise _open_error(e, dir_fd, parts[-1], path) from None
    finally:
        os.close(dir_fd)


def _open_error(e: OSError, dir_fd: int, name: str, path: Path) -> Exception:
    """ASSET_CHANGED for a symlink found where the canonical path had none; else the OSError."""
    if e.errno == errno.ELOOP:
        return asset_changed(path)
    if e.errno == errno.ENOTDIR:
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                return asset_changed(path)
    return e
