"""Per-VM supervisor: `python -S -m metald.backends.vmm.supervisor --vmm-pid=PID --report-fd=FD
--vm-dir=DIR [--fd=N]... [--cgroup=DIR]... -- CMD...`, exec'd by the C launcher (vmm/launch.c) in
the process that forked the VMM (CMD) with those descriptors and cgroups, with cwd = vm_dir (named
on the command line too, for whoever looks for a VM's processes).

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

The launcher forks the VMM before this Python starts (the VMM's cgroup join and start overlap it:
docs/snapshots.md); the supervisor adopts the VMM (--vmm-pid) and reads --report-fd, which the
VMM's exec closes (a failed exec writes why). It runs with `python -S`, and its import path holds no
dataclasses, tempfile, hashlib or subprocess: the daemon waits for its pid line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from metald.backends.vmm import supervised

USAGE = (
    "usage: supervisor --vmm-pid=PID --report-fd=FD --vm-dir=DIR [--fd=N]... [--cgroup=DIR]..."
    " [--relay=FD,MAX,FILE]... -- CMD [ARG...]"
)


class Options:
    def __init__(self, command: list[str]) -> None:
        self.vm_dir = ""
        self.vmm_pid = 0
        self.report_fd = -1
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
        if name == "--vmm-pid":
            parsed.vmm_pid = int(value)
        elif name == "--report-fd":
            parsed.report_fd = int(value)
        elif name == "--vm-dir":
            parsed.vm_dir = value
        elif name == "--fd":
            parsed.fds.append(int(value))
        elif name == "--cgroup":
            parsed.cgroups.append(value)
        elif name == "--relay":
            parsed.relays.append(value)
        else:
            return None
    ok = parsed.vm_dir and parsed.command and parsed.vmm_pid > 0 and parsed.report_fd >= 0
    return parsed if ok else None


def main(args: Sequence[str]) -> int:
    options = _parse(args)
    if options is None:
        print(USAGE, file=sys.stderr)
        return 2
    return supervised.run(options, options.vmm_pid, options.report_fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
