"""A flood of idle connections beyond the daemon's file-descriptor limit (issue 11).

The daemon runs under a hard RLIMIT_NOFILE of 256, so it serves at most 128 connections at once.
A flooder keeps more connections open than the daemon has descriptors. Calls on a connection
made before the flood keep working (a VM is created and booted: asset opens, QEMU's launch and
SQLite all need descriptors), new connections get 503 `unavailable` or, over gRPC, UNAVAILABLE —
never a 500 "Too many open files" nor an INVALID_ARGUMENT blaming the customer's kernel_path —
and once the flood ends, every client is served again.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from metald.gen.vmprovisioner.v1 import vm_pb as pb
from tests.conftest import serving
from tests.support.daemon import Daemon
from tests.support.rpc import SERVICE, Rpc, token

pytestmark = pytest.mark.e2e

FD_LIMIT = 256
CAP = FD_LIMIT // 2
FLOOD = FD_LIMIT + 64


class FdLimitedDaemon(Daemon):
    """A daemon whose hard open-file limit is FD_LIMIT (it can raise its soft limit only that far)."""

    def argv(self) -> list[str]:
        return ["prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--", *super().argv()]


class Flood:
    """Keeps FLOOD idle connections open, reopening those the daemon closes (its idle timeout,
    or its refusal beyond the cap) every quarter second."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.refused = 0

    def __enter__(self) -> Flood:
        self._refill()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self._sockets:
            sock.close()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self._refill()

    def _refill(self) -> None:
        alive = []
        for sock in self._sockets:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                alive.append(sock)
                continue
            except OSError:
                data = b""
            self.refused += data.startswith(b"HTTP/1.1 503")
            sock.close()
        while len(alive) < FLOOD and not self._stop.is_set():
            with contextlib.suppress(OSError):
                sock = socket.create_connection(("127.0.0.1", self._port), timeout=5)
                sock.setblocking(False)
                alive.append(sock)
        self._sockets = alive


@pytest.fixture
def limited_daemon(tmp_path: Path, assets_dir: Path) -> Iterator[Daemon]:
    with serving(FdLimitedDaemon(tmp_path / "state", assets_dir, name="fdlimit")) as d:
        yield d


def _list_vms_over_grpc(daemon: Daemon, customer: str) -> tuple[grpc.StatusCode, str]:
    """A new connection (grpcio shares connections between channels unless told not to)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(f"127.0.0.1:{daemon.port}", options=options) as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/ListVms",
            request_serializer=lambda m: m.to_binary(),
            response_deserializer=pb.ListVmsResponse.from_binary,
        )
        try:
            call(pb.ListVmsRequest(), metadata=[("authorization", f"Bearer {token(customer)}")], timeout=10)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _new_connection_call(daemon: Daemon, customer: str) -> httpx.Response:
    return httpx.post(
        f"{daemon.url}/{SERVICE}/ListVms",
        json={},
        headers={"authorization": f"Bearer {token(customer)}"},
        timeout=30,
    )


def test_a_connection_flood_is_refused_without_hurting_calls(limited_daemon: Daemon) -> None:
    assert f"at most {CAP} connections, {FD_LIMIT} open files" in limited_daemon.logs()
    rpc = Rpc(limited_daemon.url, "flooded")
    rpc.ok("ListVms")  # the keep-alive connection exists before the flood
    with Flood(limited_daemon.port) as flood:
        time.sleep(0.5)
        answers = [rpc.call("CreateVm", {"config": {}}) for _ in range(3)]
        assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
        vm_id = answers[0].json()["vm_id"]
        boot = rpc.call("BootVm", {"vm_id": vm_id})
        assert boot.status_code == 200, boot.text
        assert rpc.state(vm_id) == "VM_STATE_RUNNING"

        fresh = [_new_connection_call(limited_daemon, "flooded") for _ in range(5)]
        assert {r.status_code for r in fresh} <= {200, 503}, [r.text for r in fresh]
        refused = [r for r in fresh if r.status_code == 503]
        assert refused, "no new connection was refused: the flood did not reach the cap"
        assert all(r.json()["code"] == "unavailable" for r in refused)
        code, details = _list_vms_over_grpc(limited_daemon, "flooded")
        assert code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.OK,
        ), details
        assert flood.refused > 0
    # The flood's last connections may still wait in the listen backlog, closed by the flooder:
    # each takes a slot until the server reads its end, so recovery is a matter of moments.
    deadline = time.monotonic() + 30
    while (
        _new_connection_call(limited_daemon, "flooded").status_code != 200
        or _list_vms_over_grpc(limited_daemon, "flooded")[0] != grpc.StatusCode.OK
    ):
        assert time.monotonic() < deadline, "the daemon did not recover after the flood"
        time.sleep(0.2)
    assert rpc.state(vm_id) == "VM_STATE_RUNNING"
    for vm in (a.json()["vm_id"] for a in answers):
        rpc.ok("DeleteVm", {"vm_id": vm, "force": True})
    logs = limited_daemon.logs()
    assert "Too many open files" not in logs and "EMFILE" not in logs
