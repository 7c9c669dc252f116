"""A minimal writer for the cpio "newc" format the kernel unpacks as initramfs.

Writing the archive ourselves makes it reproducible (owner 0:0, fixed mtime) and lets it hold
/dev/console without root privileges.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """One archive member; path is relative (no leading slash)."""

    path: str
    mode: int  # full st_mode, file type included
    data: bytes = b""  # file content, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node


def directory(path: str) -> Entry:
    return Entry(path, stat.S_IFDIR | 0o755)


def file(path: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _member(ino: int, entry: Entry) -> bytes:
    name = entry.path.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, *entry.rdev, len(name), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    head = header + name
    return head + _pad(len(head)) + entry.data + _pad(len(entry.data))


def newc_archive(entries: list[Entry]) -> bytes:
    """Serialise entries (parents before children) into an uncompressed newc archive."""
    members = [_member(ino, e) for ino, e in enumerate(entries, start=1)]
    members.append(_member(0, Entry("TRAILER!!!", 0)))
    return b"".join(members)
