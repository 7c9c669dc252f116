"""The synchronous client. metald.client.aio.AsyncClient mirrors it method for method."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from connectrpc.errors import ConnectError
from pyqwest import SyncClient, SyncHTTPTransport

from metald.client import common
from metald.client.common import ConfigLike, ConsoleChunk, Options, RetryPolicy, StateLike
from metald.client.errors import from_connect
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.gen.vmprovisioner.v1.vm_connect import VmServiceClientSync

R = TypeVar("R")


class Client:
    """VmService over Connect (default), gRPC or gRPC-Web, plus the console and health endpoints.

    >>> with Client("http://127.0.0.1:8080", token="dev_customer_123") as c:
    ...     vm = c.create_vm({"cpu": {"vcpu_count": 1}})
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
        self._transport = SyncHTTPTransport(**self.options.transport_kwargs())
        self._http = SyncClient(self._transport)
        self._rpc = VmServiceClientSync(
            self.options.url, protocol=common.PROTOCOLS[protocol], http_client=self._http
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

    def _call(
        self, method: Callable[..., R], request: Any, *, read: bool = False, timeout: float | None = None
    ) -> R:
        policy = self.options.retry if read else common.NO_RETRY
        delays = policy.delays()
        timeout_ms = int((timeout or self.options.timeout) * 1000)
        while True:
            try:
                return method(request, headers=self.options.headers, timeout_ms=timeout_ms)
            except ConnectError as exc:
                delay = next(delays, None) if exc.code in policy.retry_on else None
                if delay is None:
                    raise from_connect(exc) from None
            time.sleep(delay)

    # ---- the RPCs ------------------------------------------------------------------------------

    def create_vm(self, config: ConfigLike = None, *, vm_id: str = "") -> pb.CreateVmResponse:
        return self._call(self._rpc.create_vm, pb.CreateVmRequest(vm_id=vm_id, config=common.config(config)))

    def boot_vm(
        self, vm_id: str, *, wait_for_ready: bool = False, wait_timeout_seconds: int = 0
    ) -> pb.BootVmResponse:
        request = pb.BootVmRequest(
            vm_id=vm_id, wait_for_ready=wait_for_ready, wait_timeout_seconds=wait_timeout_seconds
        )
        timeout = common.boot_timeout(wait_for_ready, wait_timeout_seconds, self.options.timeout)
        return self._call(self._rpc.boot_vm, request, timeout=timeout)

    def shutdown_vm(
        self, vm_id: str, *, force: bool = False, timeout_seconds: int = 0
    ) -> pb.ShutdownVmResponse:
        request = pb.ShutdownVmRequest(vm_id=vm_id, force=force, timeout_seconds=timeout_seconds)
        timeout = common.shutdown_timeout(force, timeout_seconds, self.options.timeout)
        return self._call(self._rpc.shutdown_vm, request, timeout=timeout)

    def pause_vm(self, vm_id: str) -> pb.PauseVmResponse:
        return self._call(self._rpc.pause_vm, pb.PauseVmRequest(vm_id=vm_id))

    def resume_vm(self, vm_id: str) -> pb.ResumeVmResponse:
        return self._call(self._rpc.resume_vm, pb.ResumeVmRequest(vm_id=vm_id))

    def reboot_vm(self, vm_id: str, *, force: bool = False) -> pb.RebootVmResponse:
        return self._call(self._rpc.reboot_vm, pb.RebootVmRequest(vm_id=vm_id, force=force))

    def delete_vm(self, vm_id: str, *, force: bool = False) -> pb.DeleteVmResponse:
        return self._call(self._rpc.delete_vm, pb.DeleteVmRequest(vm_id=vm_id, force=force))

    def get_vm_info(self, vm_id: str) -> pb.GetVmInfoResponse:
        return self._call(self._rpc.get_vm_info, pb.GetVmInfoRequest(vm_id=vm_id), read=True)

    def list_vms(
        self, *, states: Iterable[StateLike] = (), page_size: int = 0, page_token: str = ""
    ) -> pb.ListVmsResponse:
        request = pb.ListVmsRequest(
            state_filter=[common.state(s) for s in states], page_size=page_size, page_token=page_token
        )
        return self._call(self._rpc.list_vms, request, read=True)

    def exec_vm(
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
        return self._call(
            self._rpc.exec_vm, request, timeout=common.exec_timeout(timeout_seconds, self.options.timeout)
        )

    def write_file(self, vm_id: str, path: str, content: bytes, *, mode: int = 0) -> pb.WriteFileResponse:
        request = pb.WriteFileRequest(vm_id=vm_id, path=path, content=content, mode=mode)
        return self._call(self._rpc.write_file, request)

    def read_file(self, vm_id: str, path: str) -> pb.ReadFileResponse:
        return self._call(self._rpc.read_file, pb.ReadFileRequest(vm_id=vm_id, path=path), read=True)

    # ---- conveniences --------------------------------------------------------------------------

    def iter_vms(self, *, states: Iterable[StateLike] = (), page_size: int = 100) -> Iterator[pb.VmInfo]:
        """Every VM of the caller, page after page."""
        wanted = list(states)
        token = ""
        while True:
            page = self.list_vms(states=wanted, page_size=page_size, page_token=token)
            yield from page.vms
            token = page.next_page_token
            if not token:
                return

    def wait_for_state(
        self, vm_id: str, state: StateLike, *, timeout: float = 60.0, interval: float = 0.25
    ) -> pb.GetVmInfoResponse:
        """Poll until the VM is in `state`; TimeoutError naming the last state seen otherwise."""
        wanted = common.state(state)
        deadline = time.monotonic() + timeout
        while True:
            info = self.get_vm_info(vm_id)
            if info.state == wanted:
                return info
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{vm_id} is {common.state_name(info.state)} after {timeout:g}s, "
                    f"not {common.state_name(wanted)}"
                )
            time.sleep(interval)

    def console(self, vm_id: str, offset: int = 0, limit: int = 1 << 20) -> ConsoleChunk:
        """Console output from `offset` (at most `limit` bytes)."""
        try:
            response = self._http.get(
                self.options.console_url(vm_id, offset, limit),
                self.options.headers,
                timeout=self.options.timeout,
            )
        except common.TRANSPORT_ERRORS as exc:
            raise common.unavailable(exc) from exc
        return common.console_chunk(response, offset)

    def health(self) -> dict[str, Any]:
        """GET /health: the reference's JSON, whatever the status."""
        try:
            response = self._http.get(f"{self.options.url}/health", timeout=self.options.timeout)
        except common.TRANSPORT_ERRORS as exc:
            raise common.unavailable(exc) from exc
        return common.health_body(response)
