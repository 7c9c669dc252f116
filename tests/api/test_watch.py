"""WatchVms over every protocol with outside clients: grpcio, `buf curl` (gRPC, gRPC-Web, Connect)
and connect-node (Connect, gRPC, gRPC-Web): kept events from a cursor, resumption exactly after it,
filters, live events, another customer's events never seen, and refusals with their codes."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Any

import grpc
import pytest

from metald.gen.vmprovisioner.v1 import vm_pb as pb
from tests.api.test_clients import CLIENTS, SCHEMA, SERVICE
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc, token

pytestmark = pytest.mark.e2e
START = "0"  # the cursor before any event: everything kept


def _grpc_watch(
    daemon: Daemon, customer: str, request: pb.WatchVmsRequest, take: int, timeout: float = 30
) -> list[pb.VmEvent]:
    with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        stream = channel.unary_stream(
            f"/{SERVICE}/WatchVms",
            request_serializer=lambda m: m.to_binary(),
            response_deserializer=pb.VmEvent.from_binary,
        )(request, metadata=[("authorization", f"Bearer {token(customer)}")], timeout=timeout)
        events = []
        for event in stream:
            events.append(event)
            if len(events) == take:
                stream.cancel()
                break
        return events


def _buf_watch(
    daemon: Daemon, protocol: str, customer: str, body: dict[str, Any], take: int
) -> list[dict[str, Any]]:
    argv = [
        str(CLIENTS / "node_modules" / ".bin" / "buf"), "curl", "--schema", str(SCHEMA),
        "--protocol", protocol, "--http2-prior-knowledge",
        "-H", f"Authorization: Bearer {token(customer)}", "-d", json.dumps(body),
        f"{daemon.url}/{SERVICE}/WatchVms",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    found: list[dict[str, Any]] = []
    timer = threading.Timer(30, proc.kill)
    timer.start()
    try:
        decoder, buffer = json.JSONDecoder(), ""
        assert proc.stdout is not None
        while len(found) < take and (line := proc.stdout.readline()):
            buffer += line
            try:
                message, end = decoder.raw_decode(buffer.strip())
            except ValueError:
                continue
            found.append(message)
            buffer = buffer.strip()[end:]
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()
    return found


def _node_watch(
    daemon: Daemon, protocol: str, customer: str, body: dict[str, Any], take: int
) -> dict[str, Any]:
    proc = subprocess.run(
        ["node", str(CLIENTS / "connect_node.mjs"), daemon.url, token(customer), protocol, "WatchVms",
         json.dumps(body), str(take)],
        capture_output=True, text=True, timeout=60, cwd=CLIENTS,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_kept_events_resume_filters_and_isolation(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    first = rpc.create({})
    second = rpc.create({})
    rpc.ok("DeleteVm", {"vm_id": first})
    expected = [
        (first, pb.VmEventType.CREATED),
        (second, pb.VmEventType.CREATED),
        (first, pb.VmEventType.DELETED),
    ]
    events = _grpc_watch(daemon, customer, pb.WatchVmsRequest(after_cursor=START), 3)
    assert [(e.vm_id, e.type) for e in events] == expected
    assert events[0].state == pb.VmState.CREATED and events[0].previous_state == pb.VmState.UNSPECIFIED
    assert events[2].reason == "deleted" and events[0].at.seconds > 0

    # Resuming after an event yields exactly the later ones, in order.
    later = _grpc_watch(daemon, customer, pb.WatchVmsRequest(after_cursor=events[0].cursor), 2)
    assert [e.cursor for e in later] == [e.cursor for e in events[1:]]
    only = _grpc_watch(daemon, customer, pb.WatchVmsRequest(after_cursor=START, vm_ids=[second]), 1)
    assert [(e.vm_id, e.type) for e in only] == [(second, pb.VmEventType.CREATED)]

    # Every protocol of every outside client sees the same stream.
    for protocol in ("grpc", "grpcweb", "connect"):
        seen = _buf_watch(daemon, protocol, customer, {"after_cursor": START}, 3)
        assert [(m["vmId"], m["type"]) for m in seen] == [
            (vm, f"VM_EVENT_TYPE_{kind.name}") for vm, kind in expected
        ], seen
    for protocol in ("connect", "grpc", "grpcweb"):
        result = _node_watch(daemon, protocol, customer, {"afterCursor": events[0].cursor}, 2)
        assert [m["cursor"] for m in result["ok"]] == [e.cursor for e in events[1:]], result

    # Another customer's watch sees none of it (its stream stays empty until its deadline).
    with pytest.raises(grpc.RpcError) as caught:
        _grpc_watch(daemon, "x" + customer, pb.WatchVmsRequest(after_cursor=START), 1, timeout=2)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_live_events_and_refusals(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    box: list[pb.VmEvent] = []
    watcher = threading.Thread(
        target=lambda: box.extend(_grpc_watch(daemon, customer, pb.WatchVmsRequest(), 1)), daemon=True
    )
    watcher.start()
    time.sleep(1.0)  # the stream is open before the VM is made
    vm_id = rpc.create({})
    watcher.join(30)
    assert [(e.vm_id, e.type) for e in box] == [(vm_id, pb.VmEventType.CREATED)]

    with pytest.raises(grpc.RpcError) as caught:
        _grpc_watch(daemon, customer, pb.WatchVmsRequest(after_cursor="not-a-cursor"), 1)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = _node_watch(daemon, "connect", customer, {"afterCursor": "not-a-cursor"}, 1)["error"]
    assert error["code"] == 3 and error["details"][0]["metadata"]["field"] == "after_cursor"
    with pytest.raises(grpc.RpcError) as caught, grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        list(
            channel.unary_stream(
                f"/{SERVICE}/WatchVms",
                request_serializer=lambda m: m.to_binary(),
                response_deserializer=pb.VmEvent.from_binary,
            )(pb.WatchVmsRequest(), timeout=10)
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
