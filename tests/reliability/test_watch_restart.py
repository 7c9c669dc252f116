"""A WatchVms watcher across `kill -9` of the daemon: a grpcio client follows the stream, loses it
when the daemon dies, reconnects (while the daemon is down it keeps retrying) with the cursor of the
last event it received, and in the end has received every event of its customer exactly once, in
cursor order, the same list a fresh watch from the start of the log gives (no gap, no duplicate).

While the daemon is down one VM's QEMU is killed from outside; the restart's recovery records it
(EXITED, SHUTDOWN with a reason) and re-adopts the other (STATE_CHANGED, "readopted"): both reach
the watcher after its reconnect. A connect-node client resuming from the cursor taken just before
the kill sees the same later events.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import grpc
import pytest

from metald.gen.vmprovisioner.v1 import vm_pb as pb
from tests.api.test_clients import CLIENTS, SERVICE
from tests.reliability.common import wait_for
from tests.reliability.conftest import MakeDaemon
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc, token

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

CUSTOMER = "watcher"
T = pb.VmEventType
Key = tuple[str, str, int, int, int, str]  # cursor, vm_id, type, state, previous_state, reason


def key(event: pb.VmEvent) -> Key:
    return (event.cursor, event.vm_id, event.type, event.state, event.previous_state, event.reason)


class Watcher(threading.Thread):
    """Follows WatchVms from cursor "0" until `until(event)`; on any stream error, reconnects with
    the last cursor received (a new channel each time: no connection backoff in between)."""

    def __init__(self, daemon: Daemon, until: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.daemon_ = daemon
        self.until = until
        self.events: list[pb.VmEvent] = []
        self.resumes: list[tuple[str, str]] = []  # (cursor sent, status code of the stream that broke)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.deadline = time.monotonic() + 600

    def cursor(self) -> str:
        with self.lock:
            return self.events[-1].cursor if self.events else "0"

    def seen(self, vm_id: str, kind: int) -> bool:
        with self.lock:
            return any(e.vm_id == vm_id and e.type == kind for e in self.events)

    def run(self) -> None:
        broke = ""
        while not self.done.is_set() and time.monotonic() < self.deadline:
            after = self.cursor()
            if broke:
                self.resumes.append((after, broke))
            try:
                self._follow(after)
            except grpc.RpcError as exc:
                broke = exc.code().name
                time.sleep(0.1)

    def _follow(self, after: str) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.daemon_.port}") as channel:
            stream = channel.unary_stream(
                f"/{SERVICE}/WatchVms",
                request_serializer=lambda m: m.to_binary(),
                response_deserializer=pb.VmEvent.from_binary,
            )(
                pb.WatchVmsRequest(after_cursor=after),
                metadata=[("authorization", f"Bearer {token(CUSTOMER)}")],
                timeout=max(1.0, self.deadline - time.monotonic()),
            )
            for event in stream:
                with self.lock:
                    self.events.append(event)
                if (event.vm_id, event.type) == self.until:
                    self.done.set()
                    stream.cancel()
                    return


def full_log(daemon: Daemon, until: tuple[str, int]) -> list[pb.VmEvent]:
    """The customer's whole kept log, by a fresh watch from the start up to the `until` event."""
    events: list[pb.VmEvent] = []
    with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        stream = channel.unary_stream(
            f"/{SERVICE}/WatchVms",
            request_serializer=lambda m: m.to_binary(),
            response_deserializer=pb.VmEvent.from_binary,
        )(
            pb.WatchVmsRequest(after_cursor="0"),
            metadata=[("authorization", f"Bearer {token(CUSTOMER)}")],
            timeout=60,
        )
        for event in stream:
            events.append(event)
            if (event.vm_id, event.type) == until:
                stream.cancel()
                break
    return events


def node_watch(daemon: Daemon, after: str, take: int) -> list[dict[str, str]]:
    body = json.dumps({"afterCursor": after})
    proc = subprocess.run(
        ["node", str(CLIENTS / "connect_node.mjs"), daemon.url, token(CUSTOMER), "connect", "WatchVms",
         body, str(take)],
        capture_output=True, text=True, timeout=120, cwd=CLIENTS,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert "ok" in result, result
    seen: list[dict[str, str]] = result["ok"]
    return seen


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_watcher_resumes_across_kill9_exactly_once(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon(name="rel-wat")
    rpc = Rpc(daemon.url, CUSTOMER)
    victim, survivor = "watch-victim", "watch-survivor"
    last = (survivor, T.DELETED)
    watcher = Watcher(daemon, until=last)
    watcher.start()

    for vm_id in (victim, survivor):
        rpc.create({}, vm_id=vm_id)
        rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True, "wait_timeout_seconds": 120})
    victim_pid = int(rpc.info(victim)["backend_info"]["process_id"])
    wait_for(lambda: watcher.seen(victim, T.GUEST_READY) and watcher.seen(survivor, T.GUEST_READY), 30,
             "the watcher has both guests' GUEST_READY")  # fmt: skip

    daemon.kill9()
    os.kill(victim_pid, signal.SIGKILL)  # from outside, while no daemon watches it
    wait_for(lambda: pid_gone(victim_pid), 10, "the victim's QEMU is gone")
    time.sleep(0.5)  # the watcher meets a closed port for a while
    before_kill = watcher.cursor()
    daemon.start()

    rpc = Rpc(daemon.url, CUSTOMER)  # the old client's connection died with the daemon
    rpc.wait_state(victim, "VM_STATE_SHUTDOWN")
    rpc.wait_state(survivor, "VM_STATE_RUNNING")
    for method in ("PauseVm", "ResumeVm"):
        rpc.ok(method, {"vm_id": survivor})
    rpc.ok("ShutdownVm", {"vm_id": survivor, "force": True})
    rpc.ok("DeleteVm", {"vm_id": victim})
    rpc.ok("DeleteVm", {"vm_id": survivor})
    watcher.done.wait(60)
    watcher.done.set()
    watcher.join(30)
    assert (
        not watcher.is_alive()
        and (watcher.events and watcher.events[-1].vm_id, watcher.events[-1].type) == last
    )

    # It lost the stream at the kill and came back with the last cursor it had received.
    assert watcher.resumes and watcher.resumes[0][0] == before_kill, watcher.resumes
    assert watcher.resumes[0][1] in ("UNAVAILABLE", "INTERNAL", "UNKNOWN"), watcher.resumes

    got = [key(e) for e in watcher.events]
    truth = [key(e) for e in full_log(daemon, last)]
    cursors = [int(k[0]) for k in got]
    assert cursors == sorted(set(cursors)), f"duplicates or disorder: {cursors}"
    assert got == truth, f"watcher:\n{got}\nlog:\n{truth}"

    # Recovery's events reached the watcher after the reconnect, with their reasons.
    after = [e for e in watcher.events if int(e.cursor) > int(before_kill)]
    exited = [e for e in after if e.vm_id == victim and e.type == T.EXITED]
    assert len(exited) == 1 and exited[0].state == pb.VmState.SHUTDOWN and exited[0].reason, exited
    assert exited[0].previous_state == pb.VmState.RUNNING
    readopted = [e for e in after if e.vm_id == survivor and e.reason == "readopted"]
    assert [(e.type, e.state) for e in readopted] == [(T.STATE_CHANGED, pb.VmState.RUNNING)], after
    kinds = [(e.vm_id, e.type) for e in after]
    assert kinds.index((victim, T.EXITED)) < kinds.index((victim, T.DELETED))
    assert [e.state for e in after if e.vm_id == survivor and e.type == T.STATE_CHANGED][-3:] == [
        pb.VmState.PAUSED,
        pb.VmState.RUNNING,
        pb.VmState.SHUTDOWN,
    ]

    # A connect-node client resuming from the cursor before the kill sees exactly the same events.
    resumed = node_watch(daemon, before_kill, len(after))
    assert [m["cursor"] for m in resumed] == [e.cursor for e in after], resumed
