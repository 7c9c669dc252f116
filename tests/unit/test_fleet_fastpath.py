"""The gateway's GetVmInfo fast path (metald/fleet/fastpath.py) against a loopback stand-in for a
host: what it forwards and answers, and that everything it does not serve reaches the full path
with the request exactly as it came."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from metald.api.auth import Peer, unauthenticated
from metald.api.codec import CheckedProtoCodec, SnakeCaseJsonCodec
from metald.api.metrics import Metrics
from metald.domain.states import VmState
from metald.fleet.fastpath import PATH, FastForward
from metald.fleet.inventory import VmLocation
from metald.gen.vmprovisioner.v1 import vm_pb as pb

VM = "vm-fast"
INFO = pb.GetVmInfoResponse(vm_id=VM, state=pb.VmState.RUNNING, backend_info={"backend_type": "qemu"})


@dataclass
class Host:
    """Answers every request with `status` and `body`, keep-alive; records what it was sent."""

    status: int = 200
    body: bytes = b""
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while not reader.at_eof():
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            lines = head.decode().split("\r\n")[1:-2]
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
            self.requests.append((headers, await reader.readexactly(int(headers["content-length"]))))
            status = f"HTTP/1.1 {self.status} X\r\ncontent-type: {headers['content-type']}\r\n"
            writer.write(f"{status}content-length: {len(self.body)}\r\n\r\n".encode() + self.body)
        writer.close()


class Routes:
    def __init__(self, location: VmLocation) -> None:
        self.location = location

    def peek(self, customer_id: str, vm_id: str) -> VmLocation | None:
        ok = (customer_id, vm_id) == (self.location.customer_id, self.location.vm_id)
        return self.location if ok else None


@dataclass
class Gateway:
    routes: Routes
    seen: list[Any] = field(default_factory=list)

    async def seen_info(self, location: VmLocation, state: Any) -> None:
        self.seen.append(state)


class Hosts:
    def __init__(self) -> None:
        self.forwarded_calls: list[tuple[str, str]] = []

    def token(self, host_id: str, customer_id: str) -> str:
        return f"gw-{customer_id}-{host_id}"

    def forwarded(self, host_id: str, code: str, seconds: float) -> None:
        self.forwarded_calls.append((host_id, code))


class Auth:
    def authenticate(self, headers: dict[str, str], peer: Peer) -> str:
        if headers.get("authorization") != "Bearer dev_customer_alice":
            raise unauthenticated()
        return "alice"


@dataclass
class FullPath:
    """The gateway's API app: records the request it gets (body read through `receive`)."""

    calls: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.calls.append(({k.decode(): v.decode() for k, v in scope["headers"]}, body))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"full"})


@dataclass
class Setup:
    host: Host
    gateway: Gateway
    hosts: Hosts
    full: FullPath
    fast: FastForward


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    host = Host(body=CheckedProtoCodec().encode(INFO))
    server = await asyncio.start_server(host.serve, "127.0.0.1", 0)
    host.port = server.sockets[0].getsockname()[1]
    location = VmLocation(VM, "alice", "host7", f"http://127.0.0.1:{host.port}", True, False, VmState.CREATED)
    gateway, hosts, full = Gateway(Routes(location)), Hosts(), FullPath()
    fast = FastForward(full, gateway, hosts, Auth(), Metrics(), 1 << 20)  # type: ignore[arg-type]
    yield Setup(host, gateway, hosts, full, fast)
    await fast.close()
    server.close()


async def call(
    app: FastForward, body: bytes, headers: dict[str, str], path: str = PATH
) -> tuple[int, dict[str, str], bytes]:
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }
    parts = [body[:3], body[3:]]  # the body in two messages

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    answer = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], answer, b"".join(m.get("body", b"") for m in sent[1:])


PROTO = {"content-type": "application/proto", "authorization": "Bearer dev_customer_alice"}
REQUEST = CheckedProtoCodec().encode(pb.GetVmInfoRequest(vm_id=VM))


async def test_gzip_proto_call_is_forwarded_identity_and_answered_with_the_host_id(setup: Setup) -> None:
    headers = {**PROTO, "content-encoding": "gzip", "accept-encoding": "gzip", "x-request-id": "req-1"}
    for _ in range(2):
        status, answer, body = await call(setup.fast, gzip.compress(REQUEST), headers)
        assert status == 200 and answer["content-encoding"] == "gzip" and answer["x-request-id"] == "req-1"
        info = CheckedProtoCodec().decode(gzip.decompress(body), pb.GetVmInfoResponse)
        assert info.backend_info == {"backend_type": "qemu", "host_id": "host7"}
        assert info.state == pb.VmState.RUNNING
    sent_headers, sent_body = setup.host.requests[0]
    assert (
        sent_body == REQUEST
        and "content-encoding" not in sent_headers
        and "accept-encoding" not in sent_headers
    )
    assert (
        sent_headers["authorization"] == "Bearer gw-alice-host7" and sent_headers["x-request-id"] == "req-1"
    )
    assert setup.host.connections == 1, "the second call reuses the keep-alive connection"
    assert setup.full.calls == [] and setup.gateway.seen == [pb.VmState.RUNNING] * 2
    assert setup.hosts.forwarded_calls == [("host7", "ok")] * 2


async def test_json_call_is_answered_in_json(setup: Setup) -> None:
    setup.host.body = SnakeCaseJsonCodec().encode(INFO)
    headers = {**PROTO, "content-type": "application/json"}
    status, answer, body = await call(setup.fast, b'{"vmId": "vm-fast"}', headers)
    assert (
        status == 200
        and answer["content-type"] == "application/json"
        and answer["content-encoding"] == "identity"
    )
    assert json.loads(body)["backend_info"] == {"backend_type": "qemu", "host_id": "host7"}
    assert setup.host.requests[0][1] == b'{"vmId": "vm-fast"}'


@pytest.mark.parametrize(
    ("change", "host_status"),
    [
        ({"authorization": "Bearer dev_customer_bob"}, 200),  # not the cached customer
        ({"authorization": "Bearer nope"}, 200),  # refused: the full path's UNAUTHENTICATED
        ({"content-type": "application/grpc"}, 200),
        ({"content-encoding": "br"}, 200),
        ({"connect-timeout-ms": "soon"}, 200),
        ({"origin": "https://console.example"}, 200),  # a browser's call: CORS is an edge layer
        ({}, 404),  # the host's refusal: the full path's answer (and its stale-location retry)
        ({}, 503),
    ],
)
async def test_everything_else_reaches_the_full_path_unchanged(
    setup: Setup, change: dict[str, str], host_status: int
) -> None:
    setup.host.status = host_status
    headers = {**PROTO, **change}
    status, _, body = await call(setup.fast, REQUEST, headers)
    assert (status, body) == (299, b"full")
    assert setup.full.calls == [(headers, REQUEST)]
    assert setup.hosts.forwarded_calls == []


async def test_other_vms_and_paths_reach_the_full_path(setup: Setup) -> None:
    other = CheckedProtoCodec().encode(pb.GetVmInfoRequest(vm_id="vm-other"))
    assert (await call(setup.fast, other, PROTO))[0] == 299
    assert (await call(setup.fast, REQUEST, PROTO, path="/vmprovisioner.v1.VmService/DeleteVm"))[0] == 299
    assert (await call(setup.fast, b"\xff\xff", PROTO))[0] == 299  # does not decode
    assert len(setup.full.calls) == 3 and setup.host.requests == []


async def test_a_host_that_does_not_answer_goes_to_the_full_path_with_the_deadline_left(setup: Setup) -> None:
    setup.gateway.routes.location = VmLocation(VM, "alice", "host7", "http://127.0.0.1:1", True, False)
    status, _, _ = await call(setup.fast, REQUEST, {**PROTO, "connect-timeout-ms": "5000"})
    assert status == 299
    left = int(setup.full.calls[0][0]["connect-timeout-ms"])
    assert 0 < left <= 5000
