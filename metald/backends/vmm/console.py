"""Watching a console log for the guest's ready line, from the offset where the current boot began."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

READY_MARKER = "METALD_READY vm_id="
_CHUNK = 1 << 20


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class ReadyWatch:
    """Scans a growing log once, incrementally: each call reads only what was appended since the last."""

    def __init__(self, path: Path, vm_id: str, offset: int) -> None:
        self.path = path
        self.offset = offset  # where this boot's output starts
        self._marker = f"{READY_MARKER}{vm_id} ".encode()
        self._position = offset
        self._tail = b""  # the end of the last read, in case the marker straddles two reads
        self._restart = False
        self._inode: int | None = None  # of the file read so far
        self.ready = False

    def restart(self) -> None:
        """The guest starts again (a reset): not ready until a ready line after what is there now."""
        self.ready = False
        self._restart = True

    def _scan(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            if self._restart:
                self._restart = False
                self._position = self.offset = 0
            return False
        try:
            inode = os.fstat(fd).st_ino
            if self._restart:
                self._restart = False
                self._position = self.offset = os.fstat(fd).st_size
                self._tail = b""
            elif self._inode is not None and inode != self._inode:
                # Rotated (vmm/relay.py): finish the old file, now `<name>.1`, then read the new one.
                if self._read_rotated():
                    return True
                self._position = self.offset = 0
            self._inode = inode
            return self._read(fd)
        finally:
            os.close(fd)

    def _read_rotated(self) -> bool:
        try:
            fd = os.open(self.path.with_name(self.path.name + ".1"), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            return os.fstat(fd).st_ino == self._inode and self._read(fd)
        finally:
            os.close(fd)

    def _read(self, fd: int) -> bool:
        while chunk := os.pread(fd, _CHUNK, self._position):
            self._position += len(chunk)
            data = self._tail + chunk
            if self._marker in data:
                return True
            self._tail = data[-len(self._marker) :]
        return False

    async def poll(self) -> bool:
        """True if the ready line has appeared since `offset`."""
        if not self.ready and await asyncio.to_thread(self._scan):
            self.ready = True
        return self.ready
