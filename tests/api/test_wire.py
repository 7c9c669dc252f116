"""The API edge to the letter, as outside clients see it: early refusals over HTTP/1.1 keep-alive
(raw sockets, curl, connect-node), grpc-message encoding, unknown services, unknown and malformed
JSON, gRPC-Web text mode, reflection of error details, compression refusals, logged credentials."""

from __future__ import annotations

import base64
import json
import socket
import struct
import subprocess
import time
from typing import Any

import grpc
import httpx
import pytest

from metald.gen.google.rpc.error_details_pb import ErrorInfo
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from tests.support.daemon import REPO, Daemon
from tests.support.rpc import SERVICE, Rpc, token

CLIENTS = REPO / "tests" / "clients"


# ---- HTTP/1.1 early refusals ---------------------------------------------------------------------


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length or chunked) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:
        while len(rest) < int(headers["content-length"]):
            rest += sock.recv(65536)
        return status, headers, rest[: int(headers["content-length"])]
    assert headers.get("transfer-encoding") == "chunked", headers
    while not rest.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside a chunked body"
        rest += chunk
    return status, headers, rest


def _early_refusal(daemon: Daemon, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    """Headers with Content-Length: 2, a pause, read the answer, then send the body: the answer
    must be complete and readable, sending the body must not fail, and the connection must
    either say `Connection: close` and end cleanly or serve the next request."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(head.encode() + b"\r\n")
        time.sleep(0.3)
        status, response_headers, _ = _read_response(sock)
        sock.sendall(b"{}")  # EPIPE / ECONNRESET here is the bug
        if response_headers.get("connection", "").lower() == "close":
            sock.settimeout(10)
            assert sock.recv(65536) == b""  # a clean end, not a reset
        else:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _read_response(sock)[0] in (200, 503)
    return status, response_headers


RPC_PATH = f"/{SERVICE}/ListVms"


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        (RPC_PATH, {"Content-Type": "application/json"}, 401),
        (RPC_PATH, {"Content-Type": "text/plain", "Authorization": "Bearer dev_customer_w"}, 415),
        (f"/{SERVICE}/NoSuchMethod", {"Content-Type": "application/json"}, 404),
        (
            RPC_PATH,
            {
                "Content-Type": "application/json",
                "Authorization": "Bearer dev_customer_w",
                "Connect-Timeout-Ms": "50",
            },
            504,
        ),
    ],
)
def test_early_refusal_keeps_http1_clients_whole(
    daemon: Daemon, path: str, headers: dict[str, str], status: int
) -> None:
    for _ in range(5):
        assert _early_refusal(daemon, path, headers)[0] == status


def test_refusals_over_keepalive_curl(daemon: Daemon, tmp_path: Any) -> None:
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"vm_id": "x" * 300_000}))
    url = f"{daemon.url}{RPC_PATH}"
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}\n"]
    one = ["-H", "Content-Type: application/json", "--data-binary", f"@{body}", url]
    for _ in range(19):
        one += ["--next", "-s", "-o", "/dev/null", "-w", "%{http_code}\n", *one[:5]]
    proc = subprocess.run([*argv, *one], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["401"] * 20, proc.stderr


@pytest.mark.parametrize("protocol", ["connect", "grpcweb"])
def test_refusals_over_keepalive_connect_node(daemon: Daemon, protocol: str) -> None:
    proc = subprocess.run(
        ["node", str(CLIENTS / "refusals.mjs"), daemon.url, "", protocol, "GetVmInfo", "40", "200000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == {"codes": {"16": 40}, "messages": ["missing or invalid credentials"]}


# ---- gRPC wire details ---------------------------------------------------------------------------


def _grpc_curl(
    daemon: Daemon, method: str, body: bytes, headers: dict[str, str], service: str = SERVICE
) -> dict[str, str]:
    """The response headers and trailers of a raw gRPC call (curl, h2c prior knowledge), with the
    HTTP status as `:status`."""
    argv = ["curl", "-s", "-i", "--http2-prior-knowledge", "--data-binary", "@-", "-o", "-"]
    for key, value in {"content-type": "application/grpc", "te": "trailers", **headers}.items():
        argv += ["-H", f"{key}: {value}"]
    proc = subprocess.run(
        [*argv, f"{daemon.url}/{service}/{method}"], input=body, capture_output=True, timeout=60, check=True
    )
    fields: dict[str, str] = {}
    for line in proc.stdout.split(b"\r\n"):
        key, sep, value = line.partition(b":")
        if line.startswith(b"HTTP/"):
            fields[":status"] = line.split()[1].decode()
        elif sep and key:
            fields[key.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    return fields


def _grpc_web_post(
    daemon: Daemon, customer: str, path: str, body: bytes, content_type: str
) -> httpx.Response:
    """A gRPC-Web call (`content_type`: +proto, or -text for base64) of `customer` to /`path`."""
    headers = {"content-type": content_type, "x-grpc-web": "1", "authorization": f"Bearer {token(customer)}"}
    return httpx.post(f"{daemon.url}/{path}", content=body, headers=headers, timeout=30)


def _frame(message: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(message)) + message


def test_grpc_message_is_readable_ascii(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    request = pb.CreateVmRequest(config=pb.VmConfig(cpu=pb.CpuConfig(vcpu_count=99)))
    fields = _grpc_curl(
        daemon, "CreateVm", _frame(request.to_binary()), {"authorization": f"Bearer {token(customer)}"}
    )
    assert fields["grpc-status"] == "3"
    message = fields["grpc-message"]
    assert message.startswith("config.cpu.vcpu_count: must be between 1 and"), message
    assert "%" not in message


def test_grpc_message_escapes_what_the_spec_requires(daemon: Daemon, customer: str) -> None:
    """Non-ASCII and `%` are percent-encoded (grpcio decodes them back)."""
    with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/CreateVm",
            request_serializer=lambda m: m.to_binary(),
            response_deserializer=pb.CreateVmResponse.from_binary,
        )
        config = pb.VmConfig(boot=pb.BootConfig(kernel_path="/assets/héllo 100%"))
        with pytest.raises(grpc.RpcError) as caught:
            call(
                pb.CreateVmRequest(config=config),
                metadata=[("authorization", f"Bearer {token(customer)}")],
                timeout=30,
            )
    assert "héllo 100%" in caught.value.details()


UNKNOWN_RPCS = [
    ("no.such.v1.Service", "Method", "no.such.v1.Service"),
    (SERVICE, "NoSuchMethod", "NoSuchMethod"),
]


@pytest.mark.parametrize(("service", "method", "named"), UNKNOWN_RPCS)
def test_unknown_rpc_is_unimplemented_over_connect(
    daemon: Daemon, customer: str, service: str, method: str, named: str
) -> None:
    auth = {"authorization": f"Bearer {token(customer)}"}
    response = httpx.post(f"{daemon.url}/{service}/{method}", json={}, headers=auth, timeout=30)
    # HTTP 404 is what Connect clients read as unimplemented; the runtime's own 404 has no body
    assert response.status_code == 404
    assert not response.content or response.json()["code"] == "unimplemented"


@pytest.mark.parametrize(("service", "method", "named"), UNKNOWN_RPCS)
def test_unknown_rpc_is_unimplemented_over_grpcio(
    daemon: Daemon, customer: str, service: str, method: str, named: str
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        call = channel.unary_unary(
            f"/{service}/{method}", request_serializer=bytes, response_deserializer=bytes
        )
        with pytest.raises(grpc.RpcError) as caught:
            call(b"", metadata=[("authorization", f"Bearer {token(customer)}")], timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, caught.value.details()
    assert named in caught.value.details()


@pytest.mark.parametrize(("service", "method", "named"), UNKNOWN_RPCS)
def test_unknown_rpc_is_a_proper_grpc_answer(
    daemon: Daemon, customer: str, service: str, method: str, named: str
) -> None:
    """HTTP 200, application/grpc, the status in trailers (after the headers), over curl."""
    fields = _grpc_curl(daemon, method, _frame(b""), {"authorization": f"Bearer {token(customer)}"}, service)
    assert fields[":status"] == "200", fields
    assert fields["content-type"].startswith("application/grpc"), fields
    assert fields["grpc-status"] == "12" and named in fields["grpc-message"], fields


@pytest.mark.parametrize(("service", "method", "named"), UNKNOWN_RPCS)
def test_unknown_rpc_is_unimplemented_over_grpc_web(
    daemon: Daemon, customer: str, service: str, method: str, named: str
) -> None:
    response = _grpc_web_post(
        daemon, customer, f"{service}/{method}", _frame(b""), "application/grpc-web+proto"
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/grpc-web")
    assert response.headers["grpc-status"] == "12" and named in response.headers["grpc-message"]


def test_unimplemented_compression_names_the_accepted_ones(daemon: Daemon, customer: str) -> None:
    fields = _grpc_curl(
        daemon,
        "ListVms",
        _frame(b"", flags=1),
        {"grpc-encoding": "snappy", "authorization": f"Bearer {token(customer)}"},
    )
    assert fields["grpc-status"] == "12"
    assert "gzip" in fields["grpc-accept-encoding"]


# ---- JSON ----------------------------------------------------------------------------------------


def test_unknown_json_fields_are_ignored(rpc: Rpc) -> None:
    created = rpc.ok(
        "CreateVm",
        {"config": {"cpu": {"vcpu_count": 1, "future_knob": True}, "future": {}}, "no_such_field": 1},
    )
    assert rpc.info(created["vm_id"])["config"]["cpu"]["vcpu_count"] == 1


def test_unknown_enum_name_is_still_refused(rpc: Rpc) -> None:
    status, body = rpc.error("ListVms", {"state_filter": ["VM_STATE_RUNNNING"]})
    assert status == 400 and body["code"] == "invalid_argument"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"{not json"),
        ("application/json", b'{"vm_id": 5}'),
        ("application/proto", b"\xff\xff"),
    ],
)
def test_malformed_body_has_error_info(daemon: Daemon, customer: str, content_type: str, body: bytes) -> None:
    response = httpx.post(
        f"{daemon.url}/{SERVICE}/GetVmInfo",
        content=body,
        headers={"content-type": content_type, "authorization": f"Bearer {token(customer)}"},
        timeout=30,
    )
    assert response.status_code == 400
    error = response.json()
    assert error["code"] == "invalid_argument"
    detail = error["details"][0]
    assert detail["type"] == "google.rpc.ErrorInfo"
    raw = detail["value"]
    info = ErrorInfo.from_binary(base64.b64decode(raw + "=" * (-len(raw) % 4)))
    assert (info.reason, info.domain) == ("MALFORMED_REQUEST", "metald.unkey.com")


# ---- gRPC-Web text -------------------------------------------------------------------------------


def _grpc_web_frames(data: bytes) -> list[tuple[int, bytes]]:
    frames = []
    while data:
        flags, size = struct.unpack(">BI", data[:5])
        frames.append((flags, data[5 : 5 + size]))
        data = data[5 + size :]
    return frames


def test_grpc_web_text(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    vm_id = rpc.create({"metadata": {"name": "text-mode"}})
    body = base64.b64encode(_frame(pb.GetVmInfoRequest(vm_id=vm_id).to_binary()))
    response = _grpc_web_post(daemon, customer, f"{SERVICE}/GetVmInfo", body, "application/grpc-web-text")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/grpc-web-text")
    text = response.content
    decoded = b"".join(base64.b64decode(text[i : i + 4]) for i in range(0, len(text), 4))
    (flags, message), (trailer_flags, trailers) = _grpc_web_frames(decoded)
    assert flags == 0 and pb.GetVmInfoResponse.from_binary(message).vm_id == vm_id
    assert trailer_flags == 0x80 and b"grpc-status: 0" in trailers


def test_cors_is_off_by_default(daemon: Daemon) -> None:
    response = httpx.options(
        f"{daemon.url}{RPC_PATH}",
        headers={"origin": "https://console.example.com", "access-control-request-method": "POST"},
        timeout=30,
    )
    assert "access-control-allow-origin" not in response.headers


# ---- reflection of error details -----------------------------------------------------------------


def test_reflection_serves_error_info(daemon: Daemon) -> None:
    from connectrpc_grpcreflect._gen.grpc.reflection.v1.reflection_pb import (
        ServerReflectionRequest,
        ServerReflectionResponse,
    )
    from protobuf import Oneof
    from protobuf.wkt import FileDescriptorProto

    with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=lambda m: m.to_binary(),
            response_deserializer=ServerReflectionResponse.from_binary,
        )
        request = ServerReflectionRequest(
            message_request=Oneof("file_containing_symbol", "google.rpc.ErrorInfo")
        )
        (response,) = list(call(iter([request]), timeout=30))
    assert response.message_response is not None
    assert response.message_response.field == "file_descriptor_response", response.message_response
    files = response.message_response.value.file_descriptor_proto
    names = {FileDescriptorProto.from_binary(f).name for f in files}
    assert "google/rpc/error_details.proto" in names


# ---- credentials in logged headers ---------------------------------------------------------------


def test_token_in_request_id_is_not_logged(daemon: Daemon, customer: str) -> None:
    secret = f"dev_customer_{customer}"
    for request_id in (f"Bearer {secret}", secret):
        httpx.post(
            f"{daemon.url}{RPC_PATH}",
            json={},
            headers={"authorization": f"Bearer {secret}", "x-request-id": request_id},
            timeout=30,
        )
    time.sleep(0.5)
    assert secret not in daemon.logs()
