"""A bounded log: what a VMM writes into a pipe, appended to a file that never grows past a bound.

QEMU would write a console file itself, as fast and as far as a guest prints; a guest printing
endlessly would fill the host's disk. Instead the VMM writes into a pipe and the VM's supervisor
(vmm/supervisor.py) copies it into the file; when the file reaches half the bound it becomes
`<file>.1` (replacing the previous one) and a new file begins, so the two hold at most `max_bytes`,
the newest output. A reader that follows the file by inode (console.ReadyWatch) loses nothing
across a rotation: the old inode is still there, under the `.1` name.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import NamedTuple

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 16


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


class Relay(NamedTuple):  # not a dataclass: see vmm/supervisor.py on its start
    """Copy from descriptor `source` into `path`, bounded by `max_bytes` (see the module docstring)."""

    source: int
    path: Path
    max_bytes: int

    def option(self) -> str:
        return f"--relay={self.source},{self.max_bytes},{self.path}"

    @classmethod
    def parse(cls, value: str) -> Relay:
        fd, max_bytes, path = value.split(",", 2)
        return cls(int(fd), Path(path), int(max_bytes))

    def run(self) -> None:
        """Until the writing end closes (the VMM ended)."""
        out = os.open(self.path, _FLAGS, 0o640)
        size = os.fstat(out).st_size
        try:
            while data := os.read(self.source, _CHUNK):
                if size + len(data) > self.max_bytes // 2 and size > 0:
                    os.close(out)
                    os.replace(self.path, rotated(self.path))
                    out = os.open(self.path, _FLAGS, 0o640)
                    size = 0
                data = data[-self.max_bytes // 2 :]
                os.write(out, data)
                size += len(data)
        finally:
            os.close(out)
            os.close(self.source)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name=f"relay-{self.path.name}", daemon=False)
        thread.start()
        return thread
