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
it starts the VMM first and imports the rest after: this module imports only what the fork needs
(the VMM's cgroup join, a kernel RCU grace period on this host, and QEMU's start then overlap with
the imports of vmm/supervised.py, which does everything after the fork). It runs with `python -S`,
and its import path holds no dataclasses, tempfile, hashlib or subprocess.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from metald.backends import procfs

USAGE = (
    "usage: supervisor --vm-dir=DIR [--fd=N]... [--cgroup=DIR]... [--relay=FD,MAX,FILE]... -- CMD [ARG...]"
)
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)  # ignored by Python, default for the VMM (as Popen)


class Options:
    def __init__(self, command: list[str]) -> None:
        self.vm_dir = ""
        self.fds: list[int] = []
        self.cgroups: list[str] = []
        self.relays: list[str] = []  # FD,MAX,FILE: parsed after the fork (vmm/relay.py)
        self.command = command


def _parse(args: Sequence[str]) -> Options | None:
    if "--" not in args:
        return None
    split = list(args).index("--")
    parsed = Options(list(args[split + 1 :]))
    for option in args[:split]:
        name, _, value = option.partition("=")
        if name == "--vm-dir":
            parsed.vm_dir = value
        elif name == "--fd":
            parsed.fds.append(int(value))
        elif name == "--cgroup":
            parsed.cgroups.append(value)
        elif name == "--relay":
            parsed.relays.append(value)
        else:
            return None
    return parsed if parsed.vm_dir and parsed.command else None


def _exec_vmm(parent_pid: int, options: Options, report: int) -> NoReturn:
    """In the forked child: die with the supervisor, enter the cgroup, keep only the --fd
    descriptors (and `report`, closed by the exec) and exec; a failure is written to `report`."""
    try:
        procfs.die_with_parent(parent_pid)
        for directory in options.cgroups:
            with open(os.path.join(directory, "cgroup.procs"), "w") as procs:
                procs.write(str(os.getpid()))
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(2, 1)  # the VMM writes to the supervisor's log, never to the daemon's pipe
        keep = sorted({*options.fds, report})
        for low, high in zip([2, *keep], [*keep, os.sysconf("SC_OPEN_MAX")], strict=True):
            os.closerange(low + 1, high)
        for fd in options.fds:
            os.set_inheritable(fd, True)
        for number in _RESET_SIGNALS:
            signal.signal(number, signal.SIG_DFL)
        os.execvp(options.command[0], options.command)
    except BaseException as e:
        os.write(report, str(e).encode(errors="replace") or type(e).__name__.encode())
    finally:
        os._exit(127)


def _start_vmm(options: Options) -> tuple[int, int]:
    """The VMM's pid, and the reading end of a close-on-exec pipe that says why its exec failed
    (nothing before EOF: it runs)."""
    report_read, report = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(report_read)
        _exec_vmm(parent, options, report)
    os.close(report)
    return pid, report_read


def main(args: Sequence[str]) -> int:
    options = _parse(args)
    if options is None:
        print(USAGE, file=sys.stderr)
        return 2
    vmm = _start_vmm(options)
    from metald.backends.vmm import supervised  # after the fork: on no VM start's critical path

    return supervised.run(options, *vmm)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
