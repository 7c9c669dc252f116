"""Facts about a host process from /proc, shared by the VMM backends.

/proc files live in kernel memory: reading them never waits on a disk, so these helpers are plain
synchronous functions that are safe to call from the event loop.
"""

from __future__ import annotations

import os
from typing import NamedTuple

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class ProcStat(NamedTuple):  # not a dataclass: see vmm/supervisor.py on its start
    """The fields of /proc/PID/stat that identify a process and measure its CPU use."""

    state: str  # R, S, D, Z, T, ...
    cpu_time_nanos: int  # utime + stime
    start_time: int  # clock ticks after boot: with the pid, an identity that survives pid reuse


def read_stat(pid: int) -> ProcStat | None:
    """None when the process does not exist (any more)."""
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ")".
    fields = raw[raw.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return ProcStat(
        state=fields[0].decode(),
        cpu_time_nanos=(utime + stime) * 1_000_000_000 // _CLK_TCK,
        start_time=int(fields[19]),  # field 22 of proc(5)
    )


def read_rss_bytes(pid: int) -> int:
    """Resident memory of the process (VmRSS), 0 if it is gone or has no memory (zombie).

    From /proc/PID/statm (its second field, in pages): the same counter as status's VmRSS
    (get_mm_rss), in one short line instead of the ~55 lines the kernel formats for status."""
    raw = _read(f"/proc/{pid}/statm")
    return int(raw.split()[1]) * _PAGE_SIZE if raw else 0


def _read(path: str) -> bytes | None:
    """The whole of a small /proc file in one read, None if the process is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        return os.read(fd, 4096)
    except ProcessLookupError:  # ended between open and read
        return None
    finally:
        os.close(fd)


def read_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except (FileNotFoundError, ProcessLookupError):
        return []


def read_cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def is_live(pid: int, start_time: int) -> bool:
    """True if `pid` is still the process that started at `start_time` and is not a zombie.

    `kill -0` is not enough: an orphan re-parented to a PID 1 that never reaps stays a zombie forever,
    and a recycled pid belongs to another process.
    """
    stat = read_stat(pid)
    return stat is not None and stat.start_time == start_time and stat.state not in ("Z", "X")
