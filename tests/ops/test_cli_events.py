"""`metalctl watch` and `metalctl snapshot` as a user runs them against the running daemon, on
real guests: a create/boot/delete sequence as table rows and as JSON lines, filters and --after;
snapshot create/list/delete and `create --from-snapshot` restoring a clone."""

from __future__ import annotations

import functools
import json
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Iterator

import pytest

from tests.ops.conftest import StartDaemon
from tests.ops.support import METALCTL, metalctl
from tests.support.daemon import REPO, Daemon
from tests.support.rpc import Rpc, token

pytestmark = pytest.mark.e2e


class Watcher:
    """`metalctl watch ...` running; its stdout lines read on a thread."""

    def __init__(self, daemon: Daemon, customer: str, *args: str) -> None:
        env = {**os.environ, "METALD_URL": daemon.url, "METALD_TOKEN": token(customer)}
        self.proc = subprocess.Popen(
            [*METALCTL, "watch", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def line(self, timeout: float = 60) -> str:
        return self.lines.get(timeout=timeout)

    def until(self, done: str, timeout: float = 60) -> Iterator[str]:
        """Lines up to and with the first that contains `done`."""
        while True:
            line = self.line(timeout)
            yield line
            if done in line:
                return

    def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            status = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError("metalctl watch did not stop on Ctrl-C") from None
        assert self.proc.stderr is not None
        return status, self.proc.stderr.read()


def _row(line: str) -> tuple[str, str, str, str, str, str]:
    """(cursor, vm_id, event, state, previous, reason) of a watch row."""
    cursor, _day, _time, vm_id, event, state, previous, *reason = line.split()
    return cursor, vm_id, event, state, previous, " ".join(reason)


def test_watch_shows_create_boot_delete(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    vm_id = f"watched-{customer}"
    watcher = Watcher(daemon, customer, "--vm", vm_id)
    try:
        header = watcher.line(30)
        assert header.split() == ["CURSOR", "AT", "VM", "ID", "EVENT", "STATE", "PREVIOUS", "REASON"]
        run = functools.partial(metalctl, url=daemon.url, token=token(customer))
        assert run("create", "--vcpus", "1", "-m", "name=other").returncode == 0  # not this VM: filtered out
        made = run("create", vm_id, "--boot")
        assert made.returncode == 0, made.stderr
        assert run("delete", vm_id, "--force").returncode == 0
        rows = [_row(line) for line in watcher.until("DELETED")]
    finally:
        status, err = watcher.interrupt()
    assert status == 130, err
    assert {r[1] for r in rows} == {vm_id}
    kinds = [(event, state) for _, _, event, state, _, _ in rows]
    assert kinds[0] == ("CREATED", "CREATED") and kinds[-1][0] == "DELETED"
    running = kinds.index(("STATE_CHANGED", "RUNNING"))
    assert rows[running][4] == "CREATED"  # the previous state
    assert kinds.index(("GUEST_READY", "RUNNING")) > running
    cursors = [int(r[0]) for r in rows]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)

    # The same events again from the start, as JSON lines, and from a cursor on.
    replay = Watcher(daemon, customer, "--after", "0", "--vm", vm_id, "-o", "json")
    try:
        events = [json.loads(line) for line in replay.until("VM_EVENT_TYPE_DELETED")]
    finally:
        replay.interrupt()
    assert [int(e["cursor"]) for e in events] == cursors
    assert events[0]["type"] == "VM_EVENT_TYPE_CREATED" and events[0]["vm_id"] == vm_id
    assert events[-1]["reason"] == "deleted" and events[-1]["at"].endswith("Z")
    later = Watcher(daemon, customer, "--after", str(cursors[0]), "--vm", vm_id, "--state", "running")
    try:
        assert later.line(30).startswith("CURSOR")
        first = _row(later.line(30))
    finally:
        later.interrupt()
    assert first[0] == str(cursors[running]) and first[3] == "RUNNING"  # the first RUNNING one after it


def test_watch_refusals_exit_with_their_code(daemon: Daemon, customer: str) -> None:
    bad = metalctl("watch", "--after", "not-a-cursor", url=daemon.url, token=token(customer))
    assert bad.returncode == 3 and "after_cursor" in bad.stderr
    assert metalctl("watch", url=daemon.url, token="garbage").returncode == 16


def test_snapshot_commands_and_a_clone(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    run = functools.partial(metalctl, url=daemon.url, token=token(customer), timeout=240)
    source, snap = f"src-{customer}", f"snap-{customer}"
    assert run("create", source, "--boot", "--timeout", "90").returncode == 0
    taken = run("snapshot", "create", source, "--id", snap, "-m", "role=template")
    try:
        assert taken.returncode == 0, taken.stderr
        assert taken.stdout.split()[0] == snap and f"of {source}, RUNNING" in taken.stdout
        listed = run("snapshot", "list")
        header, row = listed.stdout.splitlines()
        assert header.split() == [
            "SNAPSHOT",
            "ID",
            "SOURCE",
            "VM",
            "VCPUS",
            "MEMORY",
            "SIZE",
            "WARM",
            "POOL",
            "CREATED",
        ]
        assert row.split()[:4] == [snap, source, "1", "256"]
        as_json = json.loads(run("snapshot", "list", "-o", "json").stdout)
        assert as_json["total_count"] == 1 and as_json["snapshots"][0]["metadata"] == {"role": "template"}

        clone = run(
            "create", f"clone-{customer}", "--from-snapshot", snap, "--boot", "--timeout", "90", "-o", "json"
        )
        assert clone.returncode == 0, clone.stderr
        assert json.loads(clone.stdout)["state"] == "VM_STATE_RUNNING"
        info = rpc.info(f"clone-{customer}")
        assert info["backend_info"]["restored_from"] == snap
        hostname = run("exec", f"clone-{customer}", "--", "cat", "/proc/sys/kernel/hostname")
        assert hostname.returncode == 0 and hostname.stdout.strip() != ""
        refused = run("create", "--from-snapshot", snap, "--memory", "512MiB")
        assert refused.returncode == 3 and "memory" in refused.stderr  # the snapshot's own memory
    finally:
        gone = run("snapshot", "delete", snap, "-o", "json")
    assert json.loads(gone.stdout) == {"snapshot_id": snap, "success": True}
    assert run("snapshot", "list").stdout.splitlines()[1:] == []
    missing = run("snapshot", "delete", snap)
    assert missing.returncode == 5 and "SNAPSHOT_NOT_FOUND" in missing.stderr
    assert run("snapshot", "create", "no-such-vm").returncode == 5


def test_watch_reconnect_resumes_across_a_daemon_kill(start_daemon: StartDaemon) -> None:
    daemon = start_daemon("cliwatch")
    run = functools.partial(metalctl, url=daemon.url, token=token("cliwatcher"))
    assert run("create", "before-kill").returncode == 0
    plain = Watcher(daemon, "cliwatcher", "--after", "0")
    resuming = Watcher(daemon, "cliwatcher", "--after", "0", "--reconnect", "-o", "json")
    try:
        assert plain.line(30).startswith("CURSOR") and _row(plain.line(30))[1] == "before-kill"
        first = json.loads(resuming.line(30))
        assert first["vm_id"] == "before-kill"
        daemon.kill9()
        assert plain.proc.wait(30) == 14  # unavailable: the stream broke, no --reconnect
        daemon.start()
        assert run("create", "after-kill").returncode == 0
        assert run("delete", "before-kill").returncode == 0
        later = [json.loads(resuming.line(60)) for _ in range(2)]
    finally:
        status, err = resuming.interrupt()
        plain.proc.kill()
        plain.proc.wait(10)
    assert status == 130, err
    assert "metalctl: watch broke (unavailable: " in err and f"resuming after cursor {first['cursor']}" in err
    assert [(e["vm_id"], e["type"]) for e in later] == [
        ("after-kill", "VM_EVENT_TYPE_CREATED"),
        ("before-kill", "VM_EVENT_TYPE_DELETED"),
    ]
    assert int(first["cursor"]) < int(later[0]["cursor"]) < int(later[1]["cursor"])  # each once
