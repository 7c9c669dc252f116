"""The API through real clients of every protocol: grpcio (gRPC), the connectrpc Python client
(Connect, binary proto), `buf curl` (gRPC and gRPC-Web) and @connectrpc/connect-node."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
from connectrpc.codec import proto_binary_codec
from connectrpc.errors import ConnectError

from metald.gen.google.rpc.error_details_pb import ErrorInfo
from metald.gen.google.rpc.status_pb import Status
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.gen.vmprovisioner.v1.vm_connect import VmServiceClient
from tests.support.daemon import REPO, Daemon
from tests.support.rpc import Rpc, token

CLIENTS = REPO / "tests" / "clients"
SCHEMA = REPO / "metald" / "gen" / "vmprovisioner.binpb"
SERVICE = "vmprovisioner.v1.VmService"


def _grpc_call(daemon: Daemon, method: str, request: Any, response_type: Any, customer: str) -> Any:
    with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=lambda m: m.to_binary(),
            response_deserializer=response_type.from_binary,
        )
        return call(request, metadata=[("authorization", f"Bearer {token(customer)}")], timeout=60)


def test_grpcio_lifecycle_and_error_details(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    created = _grpc_call(
        daemon, "CreateVm", pb.CreateVmRequest(config=pb.VmConfig()), pb.CreateVmResponse, customer
    )
    assert created.state == pb.VmState.CREATED and created.vm_id.startswith("vm_")
    info = _grpc_call(
        daemon, "GetVmInfo", pb.GetVmInfoRequest(vm_id=created.vm_id), pb.GetVmInfoResponse, customer
    )
    assert info.config.cpu.vcpu_count == 1
    listed = _grpc_call(daemon, "ListVms", pb.ListVmsRequest(), pb.ListVmsResponse, customer)
    assert [v.vm_id for v in listed.vms] == [created.vm_id] and listed.total_count == 1

    with pytest.raises(grpc.RpcError) as caught:
        _grpc_call(
            daemon,
            "GetVmInfo",
            pb.GetVmInfoRequest(vm_id=created.vm_id),
            pb.GetVmInfoResponse,
            "x" + customer,
        )
    err = caught.value
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == f"VM {created.vm_id} not found or not owned by customer"
    raw = dict(err.trailing_metadata())["grpc-status-details-bin"]
    status = Status.from_binary(raw)
    assert status.code == 7
    assert status.details[0].type_url == "type.googleapis.com/google.rpc.ErrorInfo"
    detail = ErrorInfo.from_binary(status.details[0].value)
    assert (detail.reason, detail.domain) == ("VM_NOT_OWNED", "metald.unkey.com")
    assert dict(detail.metadata) == {"vm_id": created.vm_id, "customer_id": "x" + customer}

    with pytest.raises(grpc.RpcError) as caught, grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        channel.unary_unary(
            f"/{SERVICE}/ListVms",
            request_serializer=lambda m: m.to_binary(),
            response_deserializer=pb.ListVmsResponse.from_binary,
        )(pb.ListVmsRequest(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_connectrpc_python_client_binary_proto(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    async def scenario() -> None:
        headers = {"authorization": f"Bearer {token(customer)}"}
        async with VmServiceClient(daemon.url, codec=proto_binary_codec()) as client:
            created = await client.create_vm(
                pb.CreateVmRequest(config=pb.VmConfig(memory=pb.MemoryConfig(size_bytes=512 * 1024 * 1024))),
                headers=headers,
            )
            info = await client.get_vm_info(pb.GetVmInfoRequest(vm_id=created.vm_id), headers=headers)
            assert info.config.memory.size_bytes == 512 * 1024 * 1024
            assert info.state == pb.VmState.CREATED
            with pytest.raises(ConnectError) as caught:
                await client.pause_vm(pb.PauseVmRequest(vm_id=created.vm_id), headers=headers)
            assert caught.value.code.name == "FAILED_PRECONDITION"
            detail = caught.value.details[0].value(ErrorInfo)
            assert detail is not None and detail.reason == "INVALID_STATE"
            assert detail.metadata["current_state"] == "VM_STATE_CREATED"

    asyncio.run(scenario())


def _buf_curl(
    daemon: Daemon, protocol: str, method: str, body: dict[str, Any], customer: str
) -> tuple[int, str, str]:
    argv = [
        str(CLIENTS / "node_modules" / ".bin" / "buf"),
        "curl",
        "--schema",
        str(SCHEMA),
        "--protocol",
        protocol,
        "--http2-prior-knowledge",
        "-H",
        f"Authorization: Bearer {token(customer)}",
        "-d",
        json.dumps(body),
        f"{daemon.url}/{SERVICE}/{method}",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("protocol", ["grpc", "grpcweb", "connect"])
def test_buf_curl(daemon: Daemon, rpc: Rpc, customer: str, protocol: str) -> None:
    rc, out, err = _buf_curl(daemon, protocol, "CreateVm", {"config": {"cpu": {"vcpu_count": 2}}}, customer)
    assert rc == 0, err
    vm_id = json.loads(out)["vmId"]
    rc, out, err = _buf_curl(daemon, protocol, "GetVmInfo", {"vm_id": vm_id}, customer)
    assert rc == 0, err
    assert json.loads(out)["config"]["cpu"]["vcpuCount"] == 2
    rc, out, err = _buf_curl(daemon, protocol, "GetVmInfo", {"vm_id": vm_id}, "other" + customer)
    assert rc != 0
    error = json.loads(err)
    assert error["code"] == "permission_denied"
    assert error["details"][0]["type"] == "google.rpc.ErrorInfo"
    raw = error["details"][0]["value"]
    detail = ErrorInfo.from_binary(base64.b64decode(raw + "=" * (-len(raw) % 4)))
    assert detail.reason == "VM_NOT_OWNED" and detail.metadata["customer_id"] == "other" + customer


@pytest.mark.parametrize("protocol", ["connect", "grpc", "grpcweb"])
def test_connect_node(daemon: Daemon, rpc: Rpc, customer: str, protocol: str) -> None:
    def node(method: str, body: dict[str, Any], who: str = customer) -> dict[str, Any]:
        proc = subprocess.run(
            [
                "node",
                str(CLIENTS / "connect_node.mjs"),
                daemon.url,
                token(who),
                protocol,
                method,
                json.dumps(body),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=CLIENTS,
        )
        assert proc.returncode == 0, proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    created = node("CreateVm", {"config": {"metadata": {"name": "from-node"}}})["ok"]
    assert created["state"] == "VM_STATE_CREATED"
    info = node("GetVmInfo", {"vmId": created["vm_id"]})["ok"]
    assert info["config"]["metadata"] == {"name": "from-node"}
    error = node("DeleteVm", {"vmId": created["vm_id"]}, "z" + customer)["error"]
    assert error["code"] == 7  # PERMISSION_DENIED
    assert error["details"][0]["reason"] == "VM_NOT_OWNED"
    assert error["details"][0]["metadata"]["customer_id"] == "z" + customer


def test_generated_code_is_reproducible(tmp_path: Path) -> None:
    """scripts/gen-proto.sh regenerates metald/gen exactly as committed."""
    before = {
        p.relative_to(REPO): p.read_bytes()
        for p in (REPO / "metald" / "gen").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    subprocess.run([str(REPO / "scripts" / "gen-proto.sh")], check=True, cwd=REPO)
    after = {
        p.relative_to(REPO): p.read_bytes()
        for p in (REPO / "metald" / "gen").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert before == after
