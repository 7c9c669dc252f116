"""The Python SDK (metald.client), sync and async, against the running daemon over every
protocol; its errors; and its retries, against a loopback server that fails on purpose."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from connectrpc.code import Code
from hypercorn.asyncio import serve
from hypercorn.config import Config

from metald.client import (
    AlreadyExistsError,
    AsyncClient,
    Client,
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
    RetryPolicy,
    UnauthenticatedError,
    UnavailableError,
    VmState,
)
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from tests.support.daemon import Daemon, free_port
from tests.support.rpc import Rpc, token


@pytest.mark.parametrize("protocol", ["connect", "grpc", "grpc-web"])
def test_sync_client(daemon: Daemon, rpc: Rpc, customer: str, protocol: str) -> None:
    with Client(daemon.url, token(customer), protocol=protocol) as client:
        created = client.create_vm({"cpu": {"vcpu_count": 2}, "metadata": {"name": "sdk"}}, vm_id="sdk-a")
        assert (created.vm_id, created.state) == ("sdk-a", VmState.CREATED)
        client.create_vm(pb.VmConfig(memory=pb.MemoryConfig(size_bytes=512 << 20)), vm_id="sdk-b")
        info = client.get_vm_info("sdk-a")
        assert info.config.cpu.vcpu_count == 2 and info.config.metadata["name"] == "sdk"
        assert [v.vm_id for v in client.iter_vms(page_size=1)] == ["sdk-a", "sdk-b"]
        assert client.list_vms(states=["created"]).total_count == 2
        assert client.list_vms(states=["running"]).total_count == 0

        with pytest.raises(AlreadyExistsError):
            client.create_vm(vm_id="sdk-a")
        with pytest.raises(FailedPreconditionError) as refused:
            client.pause_vm("sdk-a")
        assert refused.value.code is Code.FAILED_PRECONDITION and refused.value.grpc_code == 9
        assert refused.value.reason == "INVALID_STATE"
        assert refused.value.metadata["current_state"] == "VM_STATE_CREATED"
        assert client.delete_vm("sdk-b").success
        with pytest.raises(NotFoundError) as missing:
            client.get_vm_info("sdk-b")
        assert (missing.value.reason, missing.value.domain) == ("VM_NOT_FOUND", "metald.unkey.com")
        assert client.health()["status"] == "healthy"

    with Client(daemon.url, token("x" + customer), protocol=protocol) as stranger:
        with pytest.raises(PermissionDeniedError) as denied:
            stranger.delete_vm("sdk-a")
        assert denied.value.metadata == {"vm_id": "sdk-a", "customer_id": "x" + customer}
    with Client(daemon.url, "not-a-token", protocol=protocol) as bad, pytest.raises(UnauthenticatedError):
        bad.list_vms()


def test_url_and_token_from_the_environment(
    daemon: Daemon, rpc: Rpc, customer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm_id = rpc.create()
    monkeypatch.setenv("METALD_URL", daemon.url)
    monkeypatch.setenv("METALD_TOKEN", token(customer))
    with Client() as client:
        assert client.get_vm_info(vm_id).vm_id == vm_id


async def test_async_client(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    async with AsyncClient(daemon.url, token(customer), protocol="grpc") as client:
        created = await client.create_vm({"cpu": {"vcpu_count": 1}})
        assert created.state == VmState.CREATED
        vms = [vm.vm_id async for vm in client.iter_vms()]
        assert vms == [created.vm_id]
        results = await asyncio.gather(*(client.get_vm_info(created.vm_id) for _ in range(5)))
        assert {r.vm_id for r in results} == {created.vm_id}
        with pytest.raises(NotFoundError):
            await client.delete_vm("nope")
        chunk = await client.console(created.vm_id)
        assert (chunk.data, chunk.offset, chunk.size) == (b"", 0, 0)
        assert (await client.health())["status"] == "healthy"
        await client.delete_vm(created.vm_id)


@pytest.mark.e2e
async def test_async_boot_console_shutdown(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    async with AsyncClient(daemon.url, token(customer)) as client:
        vm_id = (await client.create_vm()).vm_id
        booted = await client.boot_vm(vm_id, wait_for_ready=True)
        assert booted.state == VmState.RUNNING
        await client.wait_for_state(vm_id, "running", timeout=5)
        chunk = await client.console(vm_id)
        assert f"METALD_READY vm_id={vm_id}".encode() in chunk.data
        assert chunk.offset == chunk.size == len(chunk.data)
        later = await client.console(vm_id, chunk.offset)
        assert later.offset >= chunk.offset
        with pytest.raises(TimeoutError):
            await client.wait_for_state(vm_id, "paused", timeout=0.5)
        assert (await client.shutdown_vm(vm_id, force=True)).state == VmState.SHUTDOWN
        await client.delete_vm(vm_id)


class FlakyServer:
    """A loopback h2c Connect endpoint that answers 503 `unavailable` `failures` times per
    method, then succeeds; it counts every call."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        method = scope["path"].rsplit("/", 1)[-1]
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.calls[method] <= self.failures:
            status, body, ctype = (
                503,
                json.dumps({"code": "unavailable", "message": "try later"}).encode(),
                b"application/json",
            )
        else:
            status, body, ctype = 200, pb.ListVmsResponse(total_count=7).to_binary(), b"application/proto"
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]})
        await send({"type": "http.response.body", "body": body})

    def __enter__(self) -> FlakyServer:
        ready = threading.Event()

        def run() -> None:
            async def main() -> None:
                self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
                config = Config()
                config.bind = [f"127.0.0.1:{self.port}"]
                ready.set()
                await serve(self.app, config, shutdown_trigger=self._stop.wait)  # type: ignore[arg-type]

            asyncio.run(main())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until hypercorn listens
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.02)
        raise RuntimeError("the flaky server did not start")

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def flaky() -> Iterator[FlakyServer]:
    with FlakyServer(failures=2) as server:
        yield server


FAST = RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.05)


def test_reads_are_retried_writes_are_not(flaky: FlakyServer) -> None:
    with Client(flaky.url, "t", retry=FAST) as client:
        assert client.list_vms().total_count == 7
        assert flaky.calls["ListVms"] == 3  # two 503s, then the answer
        with pytest.raises(UnavailableError) as caught:
            client.create_vm()
        assert caught.value.code is Code.UNAVAILABLE and caught.value.message == "try later"
        assert flaky.calls["CreateVm"] == 1
    with Client(flaky.url, "t", retry=RetryPolicy(attempts=2, initial_backoff=0.01)) as client:
        with pytest.raises(UnavailableError):
            client.get_vm_info("x")
        assert flaky.calls["GetVmInfo"] == 2  # gave up after its two attempts


async def test_async_reads_are_retried(flaky: FlakyServer) -> None:
    async with AsyncClient(flaky.url, "t", retry=FAST) as client:
        assert (await client.list_vms()).total_count == 7
        assert flaky.calls["ListVms"] == 3
        with pytest.raises(UnavailableError):
            await client.boot_vm("x")
        assert flaky.calls["BootVm"] == 1


def test_nothing_listening_is_unavailable() -> None:
    with (
        Client(f"http://127.0.0.1:{free_port()}", "t", retry=FAST) as client,
        pytest.raises(UnavailableError),
    ):
        client.list_vms()
