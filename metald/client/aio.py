"""The asyncio client: the methods of metald.client.core, awaitable (metald.client.sync.Client's
twin by construction: both get their methods from the core)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from types import TracebackType
from typing import TypeVar, Unpack

from connectrpc.client import ConnectClient
from connectrpc.errors import ConnectError
from pyqwest import Client as HttpClient
from pyqwest import FullResponse, HTTPTransport

from metald.client import common, core
from metald.client.calls import Call, HttpGet, RpcCall
from metald.client.common import StateLike
from metald.client.errors import from_connect
from metald.gen.vmprovisioner.v1 import vm_pb as pb

R = TypeVar("R")


class AsyncClient(core.AsyncCore):
    """>>> async with AsyncClient("http://127.0.0.1:8080", token="dev_customer_123") as c:
    ...     vms = [vm async for vm in c.iter_vms()]
    """

    def _open(self) -> None:
        self._transport = HTTPTransport(**self.options.transport_kwargs())
        self._http = HttpClient(self._transport)
        self._rpc = ConnectClient(
            self.options.url, protocol=common.PROTOCOLS[self.options.protocol], http_client=self._http
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

    async def _unary(self, call: Call[R]) -> R:
        if isinstance(call, HttpGet):
            return call.parse(await self._get(call.path))
        attempts = core.Attempts(call, self.options)
        while True:
            try:
                return await self._rpc.execute_unary(
                    request=call.request,
                    method=call.rpc.method,
                    headers=self.options.headers,
                    timeout_ms=attempts.timeout_ms,
                )
            except ConnectError as exc:
                await asyncio.sleep(attempts.delay_after(exc))

    async def _stream(self, call: RpcCall[R]) -> AsyncGenerator[R]:
        stream = self._rpc.execute_server_stream(
            request=call.request, method=call.rpc.method, headers=self.options.headers
        )
        try:
            async for message in stream:
                yield message
        except ConnectError as exc:
            raise from_connect(exc) from None
        except common.TRANSPORT_ERRORS as exc:
            raise common.unavailable(exc) from exc
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def _get(self, path: str) -> FullResponse:
        try:
            url = self.options.url + path
            return await asyncio.wait_for(self._http.get(url, self.options.headers), self.options.timeout)
        except common.TRANSPORT_ERRORS as exc:
            raise common.unavailable(exc) from exc

    # ---- conveniences over the methods of core.VmServiceMethods ---------------------------------

    async def watch_vms(self, **options: Unpack[core.WatchOptions]) -> AsyncGenerator[pb.VmEvent]:
        """The caller's VM events, as core.WatchOptions says."""
        watch = core.Watch.of(retry=self.options.retry, **options)
        while (step := watch.next()) is not None:
            await asyncio.sleep(step[0])
            with watch.guard():
                async with contextlib.aclosing(self._stream(step[1])) as events:
                    async for event in events:
                        yield watch.seen(event)

    async def iter_vms(
        self, *, states: Iterable[StateLike] = (), page_size: int = 100
    ) -> AsyncIterator[pb.VmInfo]:
        """Every VM of the caller, page after page."""
        pages = core.vm_pages(states, page_size)
        while (call := pages.next()) is not None:
            for vm in pages.items(await self._unary(call)):
                yield vm

    async def iter_snapshots(self, *, page_size: int = 100) -> AsyncIterator[pb.Snapshot]:
        """Every snapshot of the caller, oldest first."""
        pages = core.snapshot_pages(page_size)
        while (call := pages.next()) is not None:
            for snapshot in pages.items(await self._unary(call)):
                yield snapshot

    async def wait_for_state(
        self, vm_id: str, state: StateLike, *, timeout: float = 60.0, interval: float = 0.25
    ) -> pb.GetVmInfoResponse:
        """Poll until the VM is in `state`; TimeoutError naming the last state seen otherwise."""
        wait = core.StateWait(vm_id, state, timeout)
        while True:
            if wait.reached(await self.get_vm_info(vm_id)):
                return wait.info
            await asyncio.sleep(interval)
