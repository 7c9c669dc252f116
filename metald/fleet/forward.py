"""Calls from a gateway to the host that owns a VM: the project's own Connect client (binary
protobuf, uncompressed, over cleartext HTTP/2, one multiplexed connection per host) with a gateway token per
(customer, host) reused for half its lifetime, and the host's answer (code, reason, metadata)
passed on unchanged."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from pyqwest import Client as HttpClient
from pyqwest import HTTPTransport, HTTPVersion

from metald.client import common
from metald.client.errors import ApiError, from_connect
from metald.domain.errors import ErrorCode, MetaldError
from metald.fleet.metrics import FleetMetrics
from metald.fleet.tokens import TOKEN_TTL_SECONDS, GatewayTokens
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.gen.vmprovisioner.v1.vm_connect import VmServiceClient
from metald.usecases import ConsoleChunk

R = TypeVar("R")
DEFAULT_TIMEOUT_SECONDS = 60.0
_CODES = {code.value: code for code in ErrorCode}
TOKEN_REUSE_SECONDS = TOKEN_TTL_SECONDS / 2  # a reused token has at least half its life left
MAX_CACHED_TOKENS = 10_000


def host_unreachable(host_id: str, exc: BaseException) -> MetaldError:
    return MetaldError(
        ErrorCode.UNAVAILABLE,
        f"host {host_id} did not answer ({type(exc).__name__}); the outcome is unknown, retry",
        reason="HOST_UNAVAILABLE",  # to a caller the same as a lapsed lease
        metadata={"host_id": host_id},
    )


def _from_api(api: ApiError) -> MetaldError:
    return MetaldError(
        _CODES.get(api.code.value, ErrorCode.INTERNAL), api.message, reason=api.reason, metadata=api.metadata
    )


def _from_host(exc: ConnectError, host_id: str) -> MetaldError:
    api = from_connect(exc)
    if api.code.value == "unavailable" and not api.reason:  # the connection, not the host's answer
        return host_unreachable(host_id, exc)
    return _from_api(api)


class HostClients:
    def __init__(self, tokens: GatewayTokens, metrics: FleetMetrics) -> None:
        self._tokens = tokens
        self._metrics = metrics
        self._transport = HTTPTransport(http_version=HTTPVersion.HTTP2)
        self._http = HttpClient(self._transport)
        self._clients: dict[str, VmServiceClient] = {}
        self._minted: dict[tuple[str, str], tuple[str, float]] = {}  # -> (token, reuse until)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        await self._transport.aclose()

    def token(self, host_id: str, customer_id: str) -> str:
        """A gateway token for the customer at the host (reused for half its life)."""
        key, now = (customer_id, host_id), time.monotonic()
        token, reuse_until = self._minted.get(key, ("", 0.0))
        if now >= reuse_until:
            if len(self._minted) >= MAX_CACHED_TOKENS:
                self._minted.clear()
            token = self._tokens.mint(customer_id, host_id)
            self._minted[key] = (token, now + TOKEN_REUSE_SECONDS)
        return token

    def _headers(self, host_id: str, customer_id: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token(host_id, customer_id)}"}

    def forwarded(self, host_id: str, code: str, seconds: float) -> None:
        """Count a call forwarded to a host (the fast path's too)."""
        self._metrics.forwarded(host_id, code, seconds)

    def rpc(self, url: str) -> VmServiceClient:
        client = self._clients.get(url)
        if client is None:
            client = VmServiceClient(  # uncompressed: gzip of small messages costs both ends CPU only
                url,
                protocol=ProtocolType.CONNECT,
                http_client=self._http,
                send_compression=None,
                accept_compression=(),
            )
            self._clients[url] = client
        return client

    async def call(
        self,
        host_id: str,
        customer_id: str,
        method: Callable[..., Awaitable[R]],
        request: Any,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> R:
        """`method` of `rpc(url)` on behalf of the customer; errors as the host gave them."""
        started = time.monotonic()
        code = "ok"
        try:
            return await method(
                request, headers=self._headers(host_id, customer_id), timeout_ms=int(timeout * 1000)
            )
        except ConnectError as exc:
            error = _from_host(exc, host_id)
            code = error.code.value
            raise error from None
        except common.TRANSPORT_ERRORS as exc:
            code = "unavailable"
            raise host_unreachable(host_id, exc) from exc
        finally:
            self.forwarded(host_id, code, time.monotonic() - started)

    async def watch(
        self, host_id: str, url: str, customer_id: str, request: pb.WatchVmsRequest
    ) -> AsyncGenerator[pb.VmEvent, None]:
        """The host's WatchVms stream for the customer (no deadline); errors as for `call`."""
        self._metrics.watch_opened(host_id)
        try:
            async for event in self.rpc(url).watch_vms(request, headers=self._headers(host_id, customer_id)):
                yield event
        except ConnectError as exc:
            raise _from_host(exc, host_id) from None
        except common.TRANSPORT_ERRORS as exc:
            raise host_unreachable(host_id, exc) from exc
        finally:
            self._metrics.watch_closed(host_id)

    async def console(
        self, host_id: str, url: str, customer_id: str, vm_id: str, offset: int, limit: int
    ) -> ConsoleChunk:
        target = common.Options(url=url).resolved().console_url(vm_id, offset, limit)
        started = time.monotonic()
        try:
            response = await asyncio.wait_for(
                self._http.get(target, self._headers(host_id, customer_id)), DEFAULT_TIMEOUT_SECONDS
            )
        except common.TRANSPORT_ERRORS as exc:
            self._metrics.forwarded(host_id, "unavailable", time.monotonic() - started)
            raise host_unreachable(host_id, exc) from exc
        try:
            chunk = common.console_chunk(response, offset)
        except ApiError as exc:
            self._metrics.forwarded(host_id, exc.code.value, time.monotonic() - started)
            raise _from_api(exc) from None
        self._metrics.forwarded(host_id, "ok", time.monotonic() - started)
        return ConsoleChunk(chunk.data, chunk.offset, chunk.size)
