"""Per-VM supervisor: `python -m metald.backends.qemu.supervisor CMD...`, run with cwd = vm_dir.

It is QEMU's parent so that QEMU is always reaped and its exit status recorded, whatever happens to
the daemon (here an orphan QEMU re-parented to PID 1 would stay a zombie forever). It runs in its own
session, so killing the daemon leaves it and its VM running. QEMU gets SIGKILL if the supervisor dies,
so no QEMU ever runs unsupervised.

Trade-off: after a daemon restart the supervisor itself is an orphan of PID 1; when its VM ends it
exits and may stay a zombie there. That costs a pid and a few KiB, not QEMU's memory, and the daemon
never mistakes it for a live VM (it checks /proc state and start time, and watches pidfds).

Protocol: writes vmm.json (pids and start times), prints QEMU's pid on stdout and closes it, waits
for QEMU, writes exit.json {"returncode": rc} (negative: killed by that signal), exits.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from metald.backends import procfs
from metald.backends.qemu import layout


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _identity(pid: int) -> int:
    stat = procfs.read_stat(pid)
    return stat.start_time if stat else 0


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: supervisor CMD [ARG...]", file=sys.stderr)
        return 2
    vm_dir = Path.cwd()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr.fileno(),
            stderr=sys.stderr.fileno(),
            preexec_fn=functools.partial(procfs.die_with_parent, os.getpid()),
        )
    except OSError as e:
        print(f"supervisor: cannot run {argv[0]}: {e}", file=sys.stderr)
        return 127
    state = {
        "pid": proc.pid,
        "start_time": _identity(proc.pid),
        "supervisor_pid": os.getpid(),
        "supervisor_start_time": _identity(os.getpid()),
    }
    write_json_atomic(vm_dir / layout.VMM_STATE, state)
    print(proc.pid, flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the daemon may go away
    returncode = proc.wait()
    write_json_atomic(vm_dir / layout.EXIT_STATE, {"returncode": returncode})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
