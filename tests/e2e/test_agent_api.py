"""ExecVm, WriteFile and ReadFile end to end: a running daemon, real guests, real clients
(Connect JSON over httpx, grpcio, the connectrpc client with binary proto)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from connectrpc.codec import proto_binary_codec
from connectrpc.errors import ConnectError

from metald.client import AsyncClient, Client, NotFoundError
from metald.gen.google.rpc.error_details_pb import ErrorInfo
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.gen.vmprovisioner.v1.vm_connect import VmServiceClient
from tests.conftest import serving
from tests.ops.support import METALCTL
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc, token

pytestmark = pytest.mark.e2e
MIB = 1 << 20
SERVICE = "vmprovisioner.v1.VmService"


@pytest.fixture(scope="module")
def agent_daemon(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Iterator[Daemon]:
    # Requests up to 20 MiB, so that 16 MiB files fit (the default request limit is 1 MiB).
    with serving(
        Daemon(tmp_path_factory.mktemp("metald-agent"), assets_dir, "--max-request-bytes", str(20 * MIB))
    ) as d:
        yield d


@pytest.fixture(scope="module")
def owner(agent_daemon: Daemon) -> Iterator[Rpc]:
    rpc = Rpc(agent_daemon.url, "agentowner")
    try:
        yield rpc
    finally:
        rpc.delete_all()


@pytest.fixture(scope="module")
def vm(owner: Rpc) -> str:
    vm_id = owner.create({}, vm_id="agentvm")
    owner.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True})
    return vm_id


def execute(rpc: Rpc, vm_id: str, *argv: str, **fields: Any) -> dict[str, Any]:
    body = {"vm_id": vm_id, "command": list(argv), **fields}
    out = rpc.ok("ExecVm", body)
    for stream in ("stdout", "stderr"):
        out[stream] = base64.b64decode(out.get(stream, ""))
    return out


def error_of(rpc: Rpc, method: str, body: dict[str, Any], **kw: Any) -> tuple[str, str]:
    _, payload = rpc.error(method, body, **kw)
    details = payload.get("details") or [{}]
    info = details[0].get("debug") or {}
    return payload["code"], info.get("reason", "")


def test_exec_output_exit_code_env_cwd_and_binary_stdin(owner: Rpc, vm: str) -> None:
    out = execute(owner, vm, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (out["stdout"], out["stderr"], out.get("exit_code")) == (b"out\n", b"err\n", 3)
    assert not out.get("timed_out") and not out.get("truncated")
    out = execute(
        owner, vm, "sh", "-c", 'echo "$GREETING" "$(pwd)"', env={"GREETING": "hi there"}, working_dir="/tmp"
    )
    assert out["stdout"] == b"hi there /tmp\n" and out.get("exit_code", 0) == 0
    blob = bytes(range(256)) * 64
    out = execute(owner, vm, "cat", stdin=base64.b64encode(blob).decode())
    assert out["stdout"] == blob
    out = execute(owner, vm, "hostname")
    assert out["stdout"] == b"agentvm\n"
    out = execute(owner, vm, "no-such-program")
    assert out["exit_code"] == 127 and b"no-such-program" in out["stderr"]


def test_timeout_kills_the_command_in_the_guest(owner: Rpc, vm: str) -> None:
    started = time.monotonic()
    out = execute(owner, vm, "sh", "-c", "sleep 1000 & sleep 999", timeout_seconds=1)
    assert out["timed_out"] is True and out["exit_code"] == 128 + 9
    assert time.monotonic() - started < 10
    left = execute(owner, vm, "sh", "-c", "ps -o args | grep -c '^sleep 99[9]\\|^sleep 100[0]' || true")
    assert left["stdout"] == b"0\n", "the command and what it started are killed"


def test_several_execs_at_once_on_one_vm(agent_daemon: Daemon, owner: Rpc, vm: str) -> None:
    """The first exec waits for a file the second creates: serialised execs would never finish."""
    results: dict[str, Any] = {}

    def grpc_exec(name: str, argv: list[str]) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{agent_daemon.port}") as channel:
            call = channel.unary_unary(
                f"/{SERVICE}/ExecVm",
                request_serializer=lambda m: m.to_binary(),
                response_deserializer=pb.ExecVmResponse.from_binary,
            )
            request = pb.ExecVmRequest(vm_id=vm, command=argv, timeout_seconds=20)
            results[name] = call(
                request, metadata=[("authorization", f"Bearer {token('agentowner')}")], timeout=60
            )

    execute(owner, vm, "rm", "-f", "/tmp/go")
    waiter = threading.Thread(
        target=grpc_exec,
        args=("wait", ["sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.05; done; echo released"]),
    )
    waiter.start()
    time.sleep(0.5)
    others = [
        threading.Thread(
            target=grpc_exec, args=(f"n{i}", ["sh", "-c", f"echo {i}; [ {i} = 3 ] && touch /tmp/go; :"])
        )
        for i in range(4)
    ]
    for t in others:
        t.start()
    for t in [*others, waiter]:
        t.join(60)
    assert results["wait"].stdout == b"released\n" and not results["wait"].timed_out
    assert sorted(results[f"n{i}"].stdout for i in range(4)) == [b"0\n", b"1\n", b"2\n", b"3\n"]


def test_output_is_capped_at_16_mib_per_stream(agent_daemon: Daemon, vm: str) -> None:
    async def scenario() -> pb.ExecVmResponse:
        async with VmServiceClient(
            agent_daemon.url, codec=proto_binary_codec(), read_max_bytes=40 * MIB
        ) as client:
            request = pb.ExecVmRequest(
                vm_id=vm, command=["sh", "-c", "head -c 17825792 /dev/zero; echo tail >&2"]
            )
            return await client.exec_vm(request, headers={"authorization": f"Bearer {token('agentowner')}"})

    out = asyncio.run(scenario())
    assert out.truncated and len(out.stdout) == 16 * MIB and out.stdout.count(0) == 16 * MIB
    assert out.stderr == b"tail\n" and out.exit_code == 0


def test_write_and_read_files_binary_with_mode(agent_daemon: Daemon, owner: Rpc, vm: str) -> None:
    headers = {"authorization": f"Bearer {token('agentowner')}"}
    content = os.urandom(16 * MIB)

    async def scenario() -> tuple[pb.ReadFileResponse, pb.ReadFileResponse]:
        async with VmServiceClient(
            agent_daemon.url, codec=proto_binary_codec(), read_max_bytes=40 * MIB
        ) as client:
            await client.write_file(
                pb.WriteFileRequest(vm_id=vm, path="/root/new/dir/blob", content=content, mode=0o600),
                headers=headers,
            )
            big = await client.read_file(
                pb.ReadFileRequest(vm_id=vm, path="/root/new/dir/blob"), headers=headers
            )
            await client.write_file(
                pb.WriteFileRequest(vm_id=vm, path="/tmp/empty", content=b""), headers=headers
            )
            empty = await client.read_file(pb.ReadFileRequest(vm_id=vm, path="/tmp/empty"), headers=headers)
            return big, empty

    big, empty = asyncio.run(scenario())
    assert hashlib.sha256(big.content).digest() == hashlib.sha256(content).digest()
    assert (big.mode, big.size_bytes) == (0o600, 16 * MIB)
    assert (empty.content, empty.mode, empty.size_bytes) == (b"", 0o644, 0)
    check = execute(owner, vm, "sh", "-c", "sha256sum /root/new/dir/blob; stat -c %a /root/new/dir/blob")
    assert check["stdout"].split()[0].decode() == hashlib.sha256(content).hexdigest()
    assert check["stdout"].split()[-1] == b"600"


def test_file_errors(agent_daemon: Daemon, owner: Rpc, vm: str) -> None:
    assert error_of(owner, "ReadFile", {"vm_id": vm, "path": "/no/such/file"}) == (
        "not_found",
        "GUEST_FILE_NOT_FOUND",
    )
    assert error_of(owner, "ReadFile", {"vm_id": vm, "path": "/root"}) == (
        "invalid_argument",
        "INVALID_GUEST_PATH",
    )
    assert error_of(owner, "ReadFile", {"vm_id": vm, "path": "relative"}) == (
        "invalid_argument",
        "INVALID_FIELD",
    )
    execute(owner, vm, "sh", "-c", "head -c 17825792 /dev/zero > /tmp/big")
    assert error_of(owner, "ReadFile", {"vm_id": vm, "path": "/tmp/big"}) == (
        "resource_exhausted",
        "FILE_TOO_LARGE",
    )
    execute(owner, vm, "rm", "/tmp/big")

    # Binary proto: 16 MiB + 1 byte fits the daemon's request limit, so the refusal is metald's own.
    async def write_too_big() -> ConnectError:
        async with VmServiceClient(agent_daemon.url, codec=proto_binary_codec()) as client:
            request = pb.WriteFileRequest(vm_id=vm, path="/tmp/x", content=b"\0" * (16 * MIB + 1))
            with pytest.raises(ConnectError) as caught:
                await client.write_file(request, headers={"authorization": f"Bearer {token('agentowner')}"})
            return caught.value

    err = asyncio.run(write_too_big())
    detail = err.details[0].value(ErrorInfo)
    assert err.code.name == "INVALID_ARGUMENT" and detail is not None and detail.reason == "FILE_TOO_LARGE"
    assert "16 MiB" in err.message


def test_isolation_state_and_validation(agent_daemon: Daemon, owner: Rpc, vm: str) -> None:
    stranger = Rpc(agent_daemon.url, "agentstranger")
    for method, body in (
        ("ExecVm", {"vm_id": vm, "command": ["true"]}),
        ("WriteFile", {"vm_id": vm, "path": "/tmp/x", "content": ""}),
        ("ReadFile", {"vm_id": vm, "path": "/etc/passwd"}),
    ):
        assert error_of(stranger, method, body) == ("permission_denied", "VM_NOT_OWNED")
        assert error_of(owner, method, {**body, "vm_id": "nope"}) == ("not_found", "VM_NOT_FOUND")
    created = owner.create({})
    code, why = error_of(owner, "ExecVm", {"vm_id": created, "command": ["true"]})
    assert (code, why) == ("failed_precondition", "INVALID_STATE")
    assert error_of(owner, "ExecVm", {"vm_id": vm, "command": []}) == ("invalid_argument", "INVALID_FIELD")
    body = {"vm_id": vm, "command": ["true"], "timeout_seconds": 100000}
    assert error_of(owner, "ExecVm", body) == ("invalid_argument", "INVALID_FIELD")


def test_agent_not_answering_is_unavailable_then_recovers(owner: Rpc, vm: str) -> None:
    """The command stops the agent (its parent) for 8 s: no answer within timeout + grace."""
    script = "a=$PPID; (sleep 8; kill -CONT $a) >/dev/null 2>&1 & kill -STOP $a"
    code, why = error_of(
        owner, "ExecVm", {"vm_id": vm, "command": ["sh", "-c", script], "timeout_seconds": 1}
    )
    assert (code, why) == ("unavailable", "AGENT_UNAVAILABLE")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        resp = owner.call("ExecVm", {"vm_id": vm, "command": ["echo", "back"]})
        if resp.status_code == 200:
            assert base64.b64decode(resp.json()["stdout"]) == b"back\n"
            return
        time.sleep(0.5)
    raise AssertionError("the agent did not come back")


HOSTILE_AGENT = r"""#!/bin/sh
for p in /sys/class/virtio-ports/*; do
  [ "$(cat $p/name)" = org.metald.agent ] && port=/dev/${p##*/}
done
exec 3<> "$port"
while :; do
  printf '\365\001\021\000\000\000\000\001\377\377\377\377' >&3
  head -c 65536 /dev/urandom >&3
done
"""


def test_a_hostile_guest_agent_hurts_only_its_own_vm(agent_daemon: Daemon, owner: Rpc, vm: str) -> None:
    """A guest whose agent is replaced by one flooding the port with huge length prefixes and random
    bytes: its calls fail with AGENT_UNAVAILABLE, the daemon and the other VM carry on."""
    bad = owner.create({}, vm_id="hostilevm")
    owner.ok("BootVm", {"vm_id": bad, "wait_for_ready": True})
    owner.ok(
        "WriteFile",
        {
            "vm_id": bad,
            "path": "/tmp/hostile",
            "content": base64.b64encode(HOSTILE_AGENT.encode()).decode(),
            "mode": 0o755,
        },
    )
    # The real agent is replaced under init's respawn, then killed: init starts the hostile one.
    execute(
        owner,
        bad,
        "sh",
        "-c",
        "mv /tmp/hostile /sbin/metald-agentd && (sleep 0.3; killall metald-agentd) >/dev/null 2>&1 &",
    )
    time.sleep(2)
    for _ in range(5):
        code, why = error_of(owner, "ExecVm", {"vm_id": bad, "command": ["true"], "timeout_seconds": 2})
        assert (code, why) == ("unavailable", "AGENT_UNAVAILABLE")
        out = execute(owner, vm, "echo", "fine")
        assert out["stdout"] == b"fine\n"
    health = owner.client.get("/health")
    assert health.status_code == 200
    owner.ok("DeleteVm", {"vm_id": bad, "force": True})


def test_metalctl_exec_and_cp_both_ways(agent_daemon: Daemon, vm: str, tmp_path: Path) -> None:
    env = {**os.environ, "METALD_URL": agent_daemon.url, "METALD_TOKEN": token("agentowner")}

    def metalctl(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*METALCTL, *args], input=stdin, capture_output=True, env=env, timeout=120)

    run = metalctl("exec", vm, "-e", "X=1", "--", "sh", "-c", 'echo "x=$X"; echo oops >&2; exit 7')
    assert (run.returncode, run.stdout, run.stderr) == (7, b"x=1\n", b"oops\n")
    assert metalctl("exec", vm, "-i", "--", "wc", "-c", stdin=b"12345").stdout.strip() == b"5"
    local = tmp_path / "script.sh"
    local.write_bytes(b"#!/bin/sh\necho from-cp\n")
    local.chmod(0o750)
    assert metalctl("cp", str(local), f"{vm}:/root/script.sh").returncode == 0
    assert metalctl("exec", vm, "--", "/root/script.sh").stdout == b"from-cp\n"
    back = tmp_path / "back"
    assert metalctl("cp", f"{vm}:/root/script.sh", str(back)).returncode == 0
    assert back.read_bytes() == local.read_bytes() and back.stat().st_mode & 0o777 == 0o750
    missing = metalctl("cp", f"{vm}:/no/such", str(back))
    assert missing.returncode == 5 and b"not_found" in missing.stderr.lower() + missing.stdout.lower()


def test_sdk_clients(agent_daemon: Daemon, vm: str) -> None:
    with Client(agent_daemon.url, token("agentowner")) as client:
        client.write_file(vm, "/tmp/sdk", b"\x00sync\xff", mode=0o640)
        got = client.read_file(vm, "/tmp/sdk")
        assert (got.content, got.mode, got.size_bytes) == (b"\x00sync\xff", 0o640, 6)
        assert client.exec_vm(vm, ["cat", "/tmp/sdk"]).stdout == b"\x00sync\xff"

    async def scenario() -> None:
        async with AsyncClient(agent_daemon.url, token("agentowner"), protocol="grpc") as client:
            result = await client.exec_vm(vm, ["sh", "-c", "cat; exit 4"], stdin=b"async")
            assert (result.exit_code, result.stdout) == (4, b"async")
            with pytest.raises(NotFoundError):
                await client.read_file(vm, "/no/such")

    asyncio.run(scenario())
