"""The per-VM supervisor once its VMM is forked (vmm/supervisor.py has the protocol): closes its
copies of the VMM's descriptors, starts the relays, records vmm.json, prints the pid, waits for the
VMM, removes its cgroup and writes exit.json. Imported only after the fork, off the VMM's start."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from metald.backends import procfs
from metald.backends.vmm import cgroups, layout
from metald.backends.vmm.jsonfile import write_json_atomic
from metald.backends.vmm.relay import Relay

if TYPE_CHECKING:  # run as __main__, supervisor.py is not importable by its name without a second copy
    from metald.backends.vmm.supervisor import Options


def _identity(pid: int) -> int:
    stat = procfs.read_stat(pid)
    return stat.start_time if stat else 0


def _exec_failure(report: int) -> str:
    """What the VMM's child wrote before its exec ("" once the exec closed the pipe)."""
    chunks = []
    while chunk := os.read(report, 4096):
        chunks.append(chunk)
    os.close(report)
    return b"".join(chunks).decode(errors="replace")


def run(options: Options, pid: int, report: int) -> int:
    relays = [Relay.parse(value) for value in options.relays]
    dirs = [Path(d) for d in options.cgroups]
    here = Path()  # vm_dir, as the daemon starts us in it: followed across a rename
    if error := _exec_failure(report):
        os.waitpid(pid, 0)
        print(f"supervisor: cannot run {options.command[0]}: {error}", file=sys.stderr)
        return 127
    for fd in options.fds:
        os.close(fd)
    threads = [relay.start() for relay in relays]  # after the fork: no thread crosses it
    state = {
        "pid": pid,
        "start_time": _identity(pid),
        "supervisor_pid": os.getpid(),
        "supervisor_start_time": _identity(os.getpid()),
        "cgroup": [str(d) for d in dirs],
    }
    write_json_atomic(here / layout.VMM_STATE, state)
    print(pid, flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the daemon may go away
    returncode = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    for thread in threads:  # the VMM held the writing ends: the relays are at their end
        thread.join()
    oom_killed = returncode == -signal.SIGKILL and cgroups.oom_kills(dirs) > 0
    try:
        cgroups.remove_dirs(dirs)
    except OSError as e:
        print(f"supervisor: cannot remove cgroup {e.filename}: {e.strerror}", file=sys.stderr)
    write_json_atomic(here / layout.EXIT_STATE, {"returncode": returncode, "oom_killed": oom_killed})
    return 0
