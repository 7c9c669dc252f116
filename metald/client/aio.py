"""The asyncio client: metald.client.sync.Client's methods, awaitable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from connectrpc.errors import ConnectError
from pyqwest import Client as HttpClient
from pyqwest import FullResponse, HTTPTransport

from metald.client import common
from metald.client.common import ConfigLike, ConsoleChunk, Options, RetryPolicy, StateLike
from metald.client.errors import from_connect
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.gen.vmprovisioner.v1.vm_connect import VmServiceClient

R = TypeVar("R")


class AsyncClient:
    """>>> async with AsyncClient("http://127.0.0.1:8080", token="dev_customer_123") as c:
    ...     vms = [vm async for vm in c.iter_vms()]
    """

    def __init__(
        self,
        url: str = "",
        token: str = "",
        *,
        timeout: float = 60.0,
        protocol: str = "connect",
        retry: RetryPolicy | None = None,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        self.options = Options(
            url, token, timeout, protocol, retry or RetryPolicy(), tls_ca, tls_cert, tls_key
        ).resolved()
        self._transport = HTTPTransport(**self.options.transport_kwargs())
        self._http = HttpClient(self._transport)
        self._rpc = VmServiceClient(
            self.options.url, protocol=common.PROTOCOLS[protocol], http_client=self._http
        )

    async def close(self) -> None:
        await self._rpc.close()
        await self._transport.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _call(
        self,
        method: Callable[..., Awaitable[R]],
        request: Any,
        *,
        read: bool = False,
        timeout: float | None = None,
    ) -> R:
        policy = self.options.retry if read else common.NO_RETRY
        delays = policy.delays()
        timeout_ms = int((timeout or self.options.timeout) * 1000)
        while True:
            try:
                return await method(request, headers=self.options.headers, timeout_ms=timeout_ms)
            except ConnectError as exc:
                delay = next(delays, None) if exc.code in policy.retry_on else None
                if delay is None:
                    raise from_connect(exc) from None
            await asyncio.sleep(delay)

    async def _get(self, url: str) -> FullResponse:
        try:
            return await asyncio.wait_for(self._http.get(url, self.options.headers), self.options.timeout)
        except common.TRANSPORT_ERRORS as exc:
            raise common.unavailable(exc) from exc

    # ---- the RPCs ------------------------------------------------------------------------------

    async def create_vm(self, config: ConfigLike = None, *, vm_id: str = "") -> pb.CreateVmResponse:
        request = pb.CreateVmRequest(vm_id=vm_id, config=common.config(config))
        return await self._call(self._rpc.create_vm, request)

    async def boot_vm(
        self, vm_id: str, *, wait_for_ready: bool = False, wait_timeout_seconds: int = 0
    ) -> pb.BootVmResponse:
        request = pb.BootVmRequest(
            vm_id=vm_id, wait_for_ready=wait_for_ready, wait_timeout_seconds=wait_timeout_seconds
        )
        timeout = common.boot_timeout(wait_for_ready, wait_timeout_seconds, self.options.timeout)
        return await self._call(self._rpc.boot_vm, request, timeout=timeout)

    async def shutdown_vm(
        self, vm_id: str, *, force: bool = False, timeout_seconds: int = 0
    ) -> pb.ShutdownVmResponse:
        request = pb.ShutdownVmRequest(vm_id=vm_id, force=force, timeout_seconds=timeout_seconds)
        timeout = common.shutdown_timeout(force, timeout_seconds, self.options.timeout)
        return await self._call(self._rpc.shutdown_vm, request, timeout=timeout)

    async def pause_vm(self, vm_id: str) -> pb.PauseVmResponse:
        return await self._call(self._rpc.pause_vm, pb.PauseVmRequest(vm_id=vm_id))

    async def resume_vm(self, vm_id: str) -> pb.ResumeVmResponse:
        return await self._call(self._rpc.resume_vm, pb.ResumeVmRequest(vm_id=vm_id))

    async def reboot_vm(self, vm_id: str, *, force: bool = False) -> pb.RebootVmResponse:
        return await self._call(self._rpc.reboot_vm, pb.RebootVmRequest(vm_id=vm_id, force=force))

    async def delete_vm(self, vm_id: str, *, force: bool = False) -> pb.DeleteVmResponse:
        return await self._call(self._rpc.delete_vm, pb.DeleteVmRequest(vm_id=vm_id, force=force))

    async def get_vm_info(self, vm_id: str) -> pb.GetVmInfoResponse:
        return await self._call(self._rpc.get_vm_info, pb.GetVmInfoRequest(vm_id=vm_id), read=True)

    async def list_vms(
        self, *, states: Iterable[StateLike] = (), page_size: int = 0, page_token: str = ""
    ) -> pb.ListVmsResponse:
        request = pb.ListVmsRequest(
            state_filter=[common.state(s) for s in states], page_size=page_size, page_token=page_token
        )
        return await self._call(self._rpc.list_vms, request, read=True)

    async def exec_vm(
        self,
        vm_id: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes = b"",
        working_dir: str = "",
        timeout_seconds: int = 0,
    ) -> pb.ExecVmResponse:
        """Run argv in the running guest; the call waits for the command (+ a margin)."""
        request = pb.ExecVmRequest(
            vm_id=vm_id, command=list(command), env=dict(env or {}), stdin=stdin,
            working_dir=working_dir, timeout_seconds=timeout_seconds,
        )  # fmt: skip
        return await self._call(
            self._rpc.exec_vm, request, timeout=common.exec_timeout(timeout_seconds, self.options.timeout)
        )

    async def write_file(
        self, vm_id: str, path: str, content: bytes, *, mode: int = 0
    ) -> pb.WriteFileResponse:
        request = pb.WriteFileRequest(vm_id=vm_id, path=path, content=content, mode=mode)
        return await self._call(self._rpc.write_file, request)

    async def read_file(self, vm_id: str, path: str) -> pb.ReadFileResponse:
        return await self._call(self._rpc.read_file, pb.ReadFileRequest(vm_id=vm_id, path=path), read=True)

    # ---- conveniences --------------------------------------------------------------------------

    async def iter_vms(
        self, *, states: Iterable[StateLike] = (), page_size: int = 100
    ) -> AsyncIterator[pb.VmInfo]:
        wanted = list(states)
        token = ""
        while True:
            page = await self.list_vms(states=wanted, page_size=page_size, page_token=token)
            for vm in page.vms:
                yield vm
            token = page.next_page_token
            if not token:
                return

    async def wait_for_state(
        self, vm_id: str, state: StateLike, *, timeout: float = 60.0, interval: float = 0.25
    ) -> pb.GetVmInfoResponse:
        wanted = common.state(state)
        deadline = time.monotonic() + timeout
        while True:
            info = await self.get_vm_info(vm_id)
            if info.state == wanted:
                return info
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{vm_id} is {common.state_name(info.state)} after {timeout:g}s, "
                    f"not {common.state_name(wanted)}"
                )
            await asyncio.sleep(interval)

    async def console(self, vm_id: str, offset: int = 0, limit: int = 1 << 20) -> ConsoleChunk:
        response = await self._get(self.options.console_url(vm_id, offset, limit))
        return common.console_chunk(response, offset)

    async def health(self) -> dict[str, Any]:
        response = await self._get(f"{self.options.url}/health")
        return common.health_body(response)
