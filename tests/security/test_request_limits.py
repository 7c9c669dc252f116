"""Request size limits at the boundary (the session daemon's defaults: 1 MiB bodies, 64 metadata
entries, 2048 characters of kernel_args): the limit itself passes, one more is a clear error."""

from __future__ import annotations

import json
from typing import Any

import grpc
import httpx
import pytest

from metald.gen.vmprovisioner.v1 import vm_pb as pb
from tests.support.daemon import Daemon
from tests.support.rpc import SERVICE, Rpc, token

MAX_BODY = 1024 * 1024


def padded(payload: dict[str, Any], size: int) -> bytes:
    """`payload` as JSON, padded with insignificant whitespace to exactly `size` bytes."""
    raw = json.dumps(payload).encode()
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def post(daemon: Daemon, customer: str, body: bytes, authorization: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{daemon.url}/{SERVICE}/ListVms",
        content=body,
        headers={
            "Content-Type": "application/json",
            "Authorization": authorization or f"Bearer {token(customer)}",
        },
        timeout=60,
    )


def test_body_size_limit(daemon: Daemon, customer: str) -> None:
    assert post(daemon, customer, padded({"page_size": 1}, MAX_BODY)).status_code == 200
    resp = post(daemon, customer, padded({"page_size": 1}, MAX_BODY + 1))
    assert resp.status_code == 429, resp.text
    assert resp.json()["code"] == "resource_exhausted"
    assert f"larger than configured max {MAX_BODY}" in resp.json()["message"]
    unauthenticated = post(daemon, customer, padded({}, 8 * MAX_BODY), authorization="Bearer nope")
    assert unauthenticated.status_code == 401, "credentials are judged before any body"


def test_body_size_limit_over_grpc(daemon: Daemon, customer: str) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        create = channel.unary_unary(
            f"/{SERVICE}/CreateVm",
            request_serializer=lambda m: m.to_binary(),
            response_deserializer=pb.CreateVmResponse.from_binary,
        )
        big = pb.CreateVmRequest(config=pb.VmConfig(metadata={"k": "v" * MAX_BODY}))
        with pytest.raises(grpc.RpcError) as caught:
            create(big, metadata=[("authorization", f"Bearer {token(customer)}")], timeout=60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("config", "fits"),
    [
        ({"metadata": {f"k{i}": "v" for i in range(64)}}, True),
        ({"metadata": {f"k{i}": "v" for i in range(65)}}, False),
        ({"metadata": {"k" * 128: "v" * 1024}}, True),
        ({"metadata": {"k" * 129: "v"}}, False),
        ({"metadata": {"k": "v" * 1025}}, False),
        ({"boot": {"kernel_path": "/assets/vmlinux", "kernel_args": "x" * 2048}}, True),
        ({"boot": {"kernel_path": "/assets/vmlinux", "kernel_args": "x" * 2049}}, False),
    ],
    ids=[
        "64 entries",
        "65 entries",
        "longest key and value",
        "key too long",
        "value too long",
        "kernel_args 2048",
        "kernel_args 2049",
    ],
)
def test_config_size_limits(rpc: Rpc, config: dict[str, Any], fits: bool) -> None:
    resp = rpc.call("CreateVm", {"config": config})
    if fits:
        assert resp.status_code == 200, resp.text
        return
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["code"] == "invalid_argument"
    field = "config.metadata" if "metadata" in config else "config.boot.kernel_args"
    assert body["message"].startswith(field), body["message"]
    assert rpc.ok("ListVms", {}).get("total_count", 0) == 0
