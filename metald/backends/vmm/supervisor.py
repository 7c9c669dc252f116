"""Per-VM supervisor: `python -m metald.backends.vmm.supervisor --vm-dir=DIR [--fd=N]... [--cgroup=DIR]...
-- CMD...`, run by the daemon with cwd = vm_dir (named on the command line too, for whoever looks
for a VM's processes).

It is the VMM's parent so that the VMM is always reaped and its exit status recorded, whatever
happens to the daemon (here an orphan VMM re-parented to PID 1 would stay a zombie forever). It runs
in its own session, so killing the daemon leaves it and its VM running. The VMM gets SIGKILL if the
supervisor dies, so no VMM ever runs unsupervised.

Trade-off: after a daemon restart the supervisor itself is an orphan of PID 1; when its VM ends it
exits and may stay a zombie there. That costs a pid and a few KiB, not the VMM's memory, and the
daemon never mistakes it for a live VM (it checks /proc state and start time, and watches pidfds).

Protocol: starts CMD with the descriptors --fd (closing its own copies), copies each --relay pipe
into its bounded log file (vmm/relay.py) for as long as the VMM writes to it, inside each --cgroup
directory (joined between fork and exec: the VMM never runs outside it), writes vmm.json (pids,
start times, cgroup), prints the VMM's pid on stdout and closes it, waits for the VMM, removes the
cgroup, writes exit.json {"returncode": rc, "oom_killed": bool} (rc < 0: killed by that signal) and
exits. Its state files are written relative to its working directory, which follows vm_dir if that
is renamed (a warm pool slot becoming a VM's directory). The supervisor itself stays outside the cgroup: an OOM kill there takes the VMM, never the
process that reports it.

Its start is on the clock of every VM start (a clone's BootVm most visibly: docs/snapshots.md), so
it is run with `python -S` and imports little: no dataclasses (the NamedTuples of procfs, cgroups
and relay), no tempfile (jsonfile) and no hashlib (cgroups) on its import path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from metald.backends import procfs
from metald.backends.vmm import cgroups, layout
from metald.backends.vmm.jsonfile import write_json_atomic
from metald.backends.vmm.relay import Relay


def _identity(pid: int) -> int:
    stat = procfs.read_stat(pid)
    return stat.start_time if stat else 0


class _Options:
    def __init__(self, command: list[str]) -> None:
        self.vm_dir = Path()
        self.fds: list[int] = []
        self.cgroups: list[Path] = []
        self.relays: list[Relay] = []
        self.command = command


def _parse(args: Sequence[str]) -> _Options | None:
    if "--" not in args:
        return None
    split = list(args).index("--")
    parsed = _Options(list(args[split + 1 :]))
    vm_dir = False
    for option in args[:split]:
        name, _, value = option.partition("=")
        if name == "--vm-dir":
            parsed.vm_dir, vm_dir = Path(value), True
        elif name == "--fd":
            parsed.fds.append(int(value))
        elif name == "--cgroup":
            parsed.cgroups.append(Path(value))
        elif name == "--relay":
            parsed.relays.append(Relay.parse(value))
        else:
            return None
    return parsed if vm_dir and parsed.command else None


def _child_setup(parent_pid: int, dirs: Sequence[Path]) -> None:
    """In the forked child, before exec: die with the supervisor, enter the cgroup."""
    procfs.die_with_parent(parent_pid)
    cgroups.join(dirs, os.getpid())


def main(args: Sequence[str]) -> int:
    parsed = _parse(args)
    if parsed is None:
        print(
            "usage: supervisor --vm-dir=DIR [--fd=N]... [--cgroup=DIR]... [--relay=FD,MAX,FILE]... -- CMD [ARG...]",
            file=sys.stderr,
        )
        return 2
    fds, dirs, command = parsed.fds, parsed.cgroups, parsed.command
    here = Path()  # vm_dir, as the daemon starts us in it: followed across a rename
    parent = os.getpid()
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr.fileno(),
            stderr=sys.stderr.fileno(),
            pass_fds=fds,
            preexec_fn=lambda: _child_setup(parent, dirs),
        )
    except (OSError, subprocess.SubprocessError) as e:
        print(f"supervisor: cannot run {command[0]}: {e}", file=sys.stderr)
        return 127
    for fd in fds:
        os.close(fd)
    relays = [relay.start() for relay in parsed.relays]  # after the fork: no thread crosses it
    state = {
        "pid": proc.pid,
        "start_time": _identity(proc.pid),
        "supervisor_pid": parent,
        "supervisor_start_time": _identity(parent),
        "cgroup": [str(d) for d in dirs],
    }
    write_json_atomic(here / layout.VMM_STATE, state)
    print(proc.pid, flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the daemon may go away
    returncode = proc.wait()
    for relay in relays:  # the VMM held the writing ends: the relays are at their end
        relay.join()
    oom_killed = returncode == -signal.SIGKILL and cgroups.oom_kills(dirs) > 0
    try:
        cgroups.remove_dirs(dirs)
    except OSError as e:
        print(f"supervisor: cannot remove cgroup {e.filename}: {e.strerror}", file=sys.stderr)
    write_json_atomic(here / layout.EXIT_STATE, {"returncode": returncode, "oom_killed": oom_killed})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
