"""The synchronous client: the methods of metald.client.core, carried out with blocking I/O."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator
from types import TracebackType
from typing import TypeVar, Unpack

from connectrpc.client import ConnectClientSync
from connectrpc.errors import ConnectError
from pyqwest import FullResponse, SyncClient, SyncHTTPTransport

from metald.client import common, core
from metald.client.calls import Call, HttpGet, RpcCall
from metald.client.common import StateLike
from metald.client.errors import from_connect
from metald.gen.vmprovisioner.v1 import vm_pb as pb

R = TypeVar("R")


class Client(core.SyncCore):
    """>>> with Client("http://127.0.0.1:8080", token="dev_customer_123") as c:
    ...     vm = c.create_vm({"cpu": {"vcpu_count": 1}})
    """

    def _open(self) -> None:
        self._transport = SyncHTTPTransport(**self.options.transport_kwargs())
        self._http = SyncClient(self._transport)
        self._rpc = ConnectClientSync(
            self.options.url, protocol=common.PROTOCOLS[self.options.protocol], http_client=self._http
        )

    def close(self) -> None:
        self._rpc.close()
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _unary(self, call: Call[R]) -> R:
        if isinstance(call, HttpGet):
            return call.parse(self._get(call.path))
        attempts = core.Attempts(call, self.options)
        while True:
            try:
                return self._rpc.execute_unary(
                    request=call.request,
                    method=call.rpc.method,
                    headers=self.options.headers,
                    timeout_ms=attempts.timeout_ms,
                )
            except ConnectError as exc:
                time.sleep(attempts.delay_after(exc))

    def _stream(self, call: RpcCall[R]) -> Iterator[R]:
        try:
            yield from self._rpc.execute_server_stream(
                request=call.request, method=call.rpc.method, headers=self.options.headers
            )
        except ConnectError as exc:
            raise from_connect(exc) from None
        except common.TRANSPORT_ERRORS as exc:
            raise common.unavailable(exc) from exc

    def _get(self, path: str) -> FullResponse:
        try:
            return self._http.get(self.options.url + path, self.options.headers, timeout=self.options.timeout)
        except common.TRANSPORT_ERRORS as exc:
            raise common.unavailable(exc) from exc

    # ---- conveniences over the methods of core.VmServiceMethods ---------------------------------

    def watch_vms(self, **options: Unpack[core.WatchOptions]) -> Generator[pb.VmEvent]:
        """The caller's VM events, as core.WatchOptions says."""
        watch = core.Watch.of(retry=self.options.retry, **options)
        while (step := watch.next()) is not None:
            time.sleep(step[0])
            with watch.guard():
                for event in self._stream(step[1]):
                    yield watch.seen(event)

    def iter_vms(self, *, states: Iterable[StateLike] = (), page_size: int = 100) -> Iterator[pb.VmInfo]:
        """Every VM of the caller, page after page."""
        pages = core.vm_pages(states, page_size)
        while (call := pages.next()) is not None:
            yield from pages.items(self._unary(call))

    def iter_snapshots(self, *, page_size: int = 100) -> Iterator[pb.Snapshot]:
        """Every snapshot of the caller, oldest first."""
        pages = core.snapshot_pages(page_size)
        while (call := pages.next()) is not None:
            yield from pages.items(self._unary(call))

    def wait_for_state(
        self, vm_id: str, state: StateLike, *, timeout: float = 60.0, interval: float = 0.25
    ) -> pb.GetVmInfoResponse:
        """Poll until the VM is in `state`; TimeoutError naming the last state seen otherwise."""
        wait = core.StateWait(vm_id, state, timeout)
        while True:
            if wait.reached(self.get_vm_info(vm_id)):
                return wait.info
            time.sleep(interval)
