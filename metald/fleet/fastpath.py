"""The gateway's forwarding fast path for GetVmInfo over Connect unary (binary and JSON).

Outermost, in front of the edge layers (metald.api.serve.edge_app) and the gateway's API app, it
serves the common case without the Connect server stack and without the pyqwest client: the caller authenticated as on the full path, its VM in the
routing cache on a host whose lease is live by a fresh host view (routes.py: no query, no wait),
the host reached over a pooled HTTP/1.1 keep-alive connection on the gateway's own event loop
(h1.py), and the host answering 200. The host's message gets `backend_info["host_id"]` (decoded
and encoded by the same codecs as the full path) and the gateway counts, logs and caches the call
as the full path does (the same `rpc` log line and per-RPC series, the same forward series).

Anything else takes the full path with the request body replayed, so every refusal and every
error is the full path's own answer (codes, ErrorInfo reasons such as HOST_UNAVAILABLE, the stale
location retry): another protocol (gRPC, gRPC-Web, Connect GET), a browser's call (an Origin
header: CORS is the full path's), a compressed or oversized body, a body that does not decode, a
refused credential, a VM not cached for this caller, a host view due for its once-a-second read,
any non-200 answer or a host that did not answer (GetVmInfo reads only, so sending it again is
safe; the replayed call gets the time left of the caller's deadline). With tracing on, the fast path is not installed: spans come from the full path's interceptors.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from connectrpc.compression.gzip import GzipCompression
from connectrpc.errors import ConnectError

from metald.api.asgi import ASGIApp, Message, Receive, Scope, Send
from metald.api.auth import Authenticator, current_peer
from metald.api.codec import CheckedProtoCodec, SnakeCaseJsonCodec
from metald.api.interceptor import record_call, request_id_for
from metald.api.metrics import Metrics
from metald.domain.errors import MetaldError
from metald.fleet.forward import DEFAULT_TIMEOUT_SECONDS, HostClients
from metald.fleet.gateway import FleetGateway
from metald.fleet.h1 import Http1Pool, Origin, ProtocolError
from metald.gen.vmprovisioner.v1 import vm_pb as pb

RPC = "GetVmInfo"
PATH = f"/vmprovisioner.v1.VmService/{RPC}"
_CODECS: dict[str, Any] = {"application/proto": CheckedProtoCodec(), "application/json": SnakeCaseJsonCodec()}
_PASSED = ("connect-protocol-version", "connect-timeout-ms")  # sent on to the host as given
_HOST_FAILURES = (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ProtocolError)


# As the full path's Connect server: gzip or identity requests, gzip answers to who accepts them.
_GZIP = GzipCompression()
_ENCODINGS = ("gzip", "identity")


def _gzip_answer(accept_encoding: str) -> bool:
    """Whether gzip is the first of the caller's accepted encodings the server has (connectrpc's rule)."""
    names = (name.strip() for name in accept_encoding.split(","))
    return next((name for name in names if name in _ENCODINGS), "identity") == "gzip"


class _Fallback(Exception):
    """Not for the fast path: the full path answers."""


def _ascii_headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    try:
        for name, value in scope.get("headers", []):
            headers.setdefault(name.decode("ascii").lower(), value.decode("ascii"))
    except UnicodeDecodeError:
        raise _Fallback from None
    return headers


def _deadline(headers: dict[str, str]) -> float | None:
    """The caller's Connect deadline in seconds, if it gave one."""
    given = headers.get("connect-timeout-ms")
    if given is None:
        return None
    if not given.isdigit() or len(given) > 10:
        raise _Fallback  # the full path's INVALID_ARGUMENT
    return int(given) / 1000


@dataclass
class FastForward:
    app: ASGIApp  # the gateway's whole API app: the full path
    gateway: FleetGateway
    hosts: HostClients
    auth: Authenticator
    metrics: Metrics
    max_bytes: int  # max_request_bytes
    _pool: Http1Pool = field(default_factory=Http1Pool)
    _origins: dict[str, Origin | None] = field(default_factory=dict)

    async def close(self) -> None:
        await self._pool.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        consumed: list[Message] = []
        deadline: float | None = None
        try:
            headers = _ascii_headers(scope)
            codec = _CODECS.get(headers.get("content-type", ""))
            encoding = headers.get("content-encoding", "identity")
            if codec is None or encoding not in _ENCODINGS or "origin" in headers:
                raise _Fallback  # (a browser's call: CORS is an edge layer of the full path)
            deadline = _deadline(headers)
            body = await self._body(receive, consumed)
            if encoding == "gzip":
                body = self._gunzip(body)
            await self._forward(send, headers, codec, body, started, deadline or DEFAULT_TIMEOUT_SECONDS)
        except _Fallback:
            if deadline is not None:
                scope = _with_deadline(scope, max(1, int((deadline - (time.monotonic() - started)) * 1000)))
            await self.app(scope, _replaying(receive, consumed), send)

    def _gunzip(self, body: bytes) -> bytes:
        try:
            return _GZIP.decompress(body, self.max_bytes)
        except (ConnectError, zlib.error, OSError, EOFError):  # not gzip, or too large once it is
            raise _Fallback from None

    async def _body(self, receive: Receive, consumed: list[Message]) -> bytes:
        """The whole body (each message kept in `consumed`); _Fallback beyond the size limit."""
        size = 0
        while True:
            message = await receive()
            consumed.append(message)
            if message["type"] != "http.request":
                raise _Fallback
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                raise _Fallback
            if not message.get("more_body", False):
                return b"".join(m.get("body", b"") for m in consumed)

    async def _forward(
        self, send: Send, headers: dict[str, str], codec: Any, body: bytes, started: float, timeout: float
    ) -> None:
        try:
            vm_id = codec.decode(body, pb.GetVmInfoRequest).vm_id
            customer = self.auth.authenticate(headers, current_peer.get())
        except (MetaldError, ConnectError):
            raise _Fallback from None
        location = self.gateway.routes.peek(customer, vm_id)
        if location is None:
            raise _Fallback
        origin = self._origins.get(location.url, ...)
        if origin is ...:
            origin = self._origins[location.url] = Origin.of(location.url)
        if origin is None:
            raise _Fallback  # https to hosts: the full path's client
        request_id = request_id_for(headers.get("x-request-id", ""))
        sent = [
            ("content-type", headers["content-type"]),
            ("authorization", f"Bearer {self.hosts.token(location.host_id, customer)}"),
            ("x-request-id", request_id),
            *((name, headers[name]) for name in _PASSED if name in headers),
        ]
        forwarded = time.monotonic()
        try:
            async with asyncio.timeout(min(timeout, DEFAULT_TIMEOUT_SECONDS)):
                answer = await self._pool.post(origin, PATH, sent, body)
        except (*_HOST_FAILURES, TimeoutError):
            raise _Fallback from None
        if answer.status != 200 or dict(answer.headers).get(b"content-encoding", b"identity") != b"identity":
            raise _Fallback
        try:
            info = codec.decode(answer.body, pb.GetVmInfoResponse)
        except ConnectError:
            raise _Fallback from None
        self.hosts.forwarded(location.host_id, "ok", time.monotonic() - forwarded)
        info.backend_info["host_id"] = location.host_id
        await self.gateway.seen_info(location, info.state)
        payload = codec.encode(info)
        gzipped = _gzip_answer(headers.get("accept-encoding", ""))
        if gzipped:
            payload = _GZIP.compress(payload)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", headers["content-type"].encode()),  # as connectrpc answers
                    (b"content-encoding", b"gzip" if gzipped else b"identity"),
                    (b"vary", b"Accept-Encoding"),
                    (b"x-request-id", request_id.encode()),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
        record_call(
            self.metrics,
            RPC,
            "ok",
            time.monotonic() - started,
            request_id=request_id,
            customer=customer,
            vm_id=vm_id,
        )


def _with_deadline(scope: Scope, left_ms: int) -> Scope:
    """The scope with the caller's Connect deadline lowered to what is left of it."""
    headers = [(k, v) for k, v in scope.get("headers", []) if bytes(k).lower() != b"connect-timeout-ms"]
    return {**scope, "headers": [*headers, (b"connect-timeout-ms", str(left_ms).encode())]}


def _replaying(receive: Receive, consumed: list[Message]) -> Receive:
    """`receive` with the messages already read delivered first."""
    pending = list(consumed)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
