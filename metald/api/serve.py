"""Hypercorn: one port for Connect, gRPC and gRPC-Web (HTTP/1.1 and HTTP/2), optionally TLS, with
the edge layers every call passes: body draining, CORS, gRPC-Web text, gRPC wire details."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl

from hypercorn.asyncio import serve
from hypercorn.config import Config, Sockets

from metald.api.asgi import ASGIApp, Message, Receive, Scope, Send
from metald.api.auth import ConfigError, Peer, current_peer
from metald.api.cors import Cors, parse_origins
from metald.api.grpc_web_text import GrpcWebText
from metald.api.grpc_wire import GrpcWire
from metald.api.listener import CappedListener, connection_cap, raise_fd_limit
from metald.api.pyvoy_host import HOST, inside_envoy
from metald.settings import Settings

log = logging.getLogger("metald")

ALPN_PROTOCOLS = ["h2", "http/1.1"]
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # forward secret AEAD only (RFC 9113 9.2.2)
DRAIN_TIMEOUT = 5.0
# How long an early answer waits for a request body already in flight before it closes the connection.
EARLY_ANSWER_GRACE = 0.02
# How much of a refused body is read and discarded so that the client sees the answer rather than
# a reset stream: well above what gRPC clients send by default (4 MiB), bounded by DRAIN_TIMEOUT.
MIN_DRAIN_BYTES = 64 * 1024 * 1024
ACCEPT_ENCODING = b"gzip"  # what the RPC runtime decompresses (identity always)


class PeerRecordingSSLObject(ssl.SSLObject):
    """Publishes its connection's verified client certificate as `current_peer`.

    hypercorn 0.18 puts no TLS facts in the ASGI scope (only `scheme` and the peer address). But
    asyncio completes the server handshake and, in the same callback, creates the task that serves
    the connection (SSLProtocol._on_handshake_complete -> connection_made -> create_task), and a task
    copies the context it is created in. Each connection's transport callbacks run in a context
    copied for that connection when it was accepted, so a contextvar set here is seen by every
    request on this connection and by no other. (That is the asyncio event loop the daemon runs;
    tests/security/test_mtls.py interleaves connections with different certificates to keep it
    so.) Were the handshake ever completed elsewhere, requests would see no certificate and be
    refused: it fails closed.
    """

    def do_handshake(self) -> None:
        super().do_handshake()
        # {} without a client certificate; with CERT_OPTIONAL one that does not verify against
        # tls_client_ca has already failed the handshake above.
        if self.getpeercert():
            current_peer.set(Peer(tls_client_cert=self.getpeercert(binary_form=True)))


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS >= 1.2 with ALPN h2/http1.1. With tls_client_ca, client certificates are requested and
    verified against that CA only (no system CAs); they stay optional at the TLS layer so that
    /health works without one, and a request without one is UNAUTHENTICATED. A certificate that
    does not verify fails the handshake."""
    if not (settings.tls_cert and settings.tls_key):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca:
            context.load_verify_locations(cafile=settings.tls_client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate/key/CA: {exc}") from None
    if settings.tls_client_ca:
        context.verify_mode = ssl.CERT_OPTIONAL
        context.sslobject_class = PeerRecordingSSLObject
    return context


class DrainRequestBody:
    """Reads what is left of a request body when the answer comes before it (every call refused
    before its body is read: UNAUTHENTICATED, 415, unknown method, a Connect-Timeout-Ms deadline).

    HTTP/2: hypercorn 0.18 drops the whole connection (an unhandled KeyError, pgjones/hypercorn#329)
    when request DATA arrives for a stream whose response is already complete, killing the other
    calls multiplexed on it; so the rest of the body is read before the response ends. It also lets a
    client that is still sending an oversized message read RESOURCE_EXHAUSTED, not a reset stream.

    HTTP/1.1: hypercorn closes a connection whose request body was not read, and the unread bytes
    make the kernel reset it, so keep-alive clients (connect-go, connect-node, curl) saw EPIPE or
    "socket hang up" instead of the answer. A complete early answer is held for a moment for the
    body to arrive (the usual case: it is already in flight) so the connection stays reusable;
    otherwise it is sent whole, with Content-Length and `Connection: close`, the body is then read
    and discarded, and the connection ends cleanly. A client that waits for the answer before
    sending its body gets it at once.

    At most `max_bytes` are drained, for at most DRAIN_TIMEOUT seconds.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self._app = app
        self._max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        body = _RequestBody(receive, self._max_bytes)
        http2 = scope.get("http_version") == "2"
        await self._app(scope, body.receive, _Http2Send(send, body) if http2 else _Http1Send(send, body))


class _RequestBody:
    def __init__(self, receive: Receive, max_bytes: int) -> None:
        self._receive = receive
        self._max_bytes = max_bytes
        self.done = False

    async def receive(self) -> Message:
        message = await self._receive()
        self.done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    async def drain(self, seconds: float) -> bool:
        """Read and discard the rest of the body; whether it all came within `seconds`."""
        drained = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while not self.done and drained <= self._max_bytes:
                    drained += len((await self.receive()).get("body", b""))
        return self.done


class _Http2Send:
    def __init__(self, send: Send, body: _RequestBody) -> None:
        self._send = send
        self._body = body
        self._trailers = False

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self._trailers = bool(message.get("trailers", False))
        last = (
            kind == "http.response.body" and not message.get("more_body", False) and not self._trailers
        ) or (kind == "http.response.trailers" and not message.get("more_trailers", False))
        if last and not self._body.done:
            await self._body.drain(DRAIN_TIMEOUT)
        await self._send(message)


class _Http1Send:
    def __init__(self, send: Send, body: _RequestBody) -> None:
        self._send = send
        self._body = body
        self._held: Message | None = None
        self._closing = False

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start" and not self._body.done:
            self._held = message  # answered before the body was read: decide at the first body part
            return
        if kind != "http.response.body":
            await self._send(message)
            return
        final = not message.get("more_body", False)
        if self._held is not None:
            start, self._held = self._held, None
            if final and await self._body.drain(EARLY_ANSWER_GRACE):
                await self._send(start)  # the body came: keep-alive as usual
            else:
                self._closing = True
                await self._send(_closing_start(start, message.get("body", b"") if final else None))
        if final and self._closing and not self._body.done:
            await self._send({**message, "more_body": True})
            await self._body.drain(DRAIN_TIMEOUT)
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await self._send(message)


def _closing_start(start: Message, whole_body: bytes | None) -> Message:
    """The response start with `Connection: close`, and its length when the body is known."""
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"connection"]
    headers.append((b"connection", b"close"))
    if whole_body is not None and not any(k.lower() == b"content-length" for k, _ in headers):
        headers.append((b"content-length", str(len(whole_body)).encode()))
    return {**start, "headers": headers}


class _Config(Config):
    """hypercorn's Config, serving our own SSLContext instead of building one."""

    def __init__(self, context: ssl.SSLContext | None, connection_cap: int) -> None:
        super().__init__()
        self._context = context
        self._connection_cap = connection_cap

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._context

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        cap = self._connection_cap
        return Sockets(
            [CappedListener.wrap(s, cap) for s in sockets.secure_sockets],
            [CappedListener.wrap(s, cap) for s in sockets.insecure_sockets],
            sockets.quic_sockets,
        )


def edge_app(app: ASGIApp, settings: Settings) -> ASGIApp:
    """What every request passes before `app`, whichever the server."""
    edge = Cors(GrpcWebText(GrpcWire(app, ACCEPT_ENCODING)), parse_origins(settings.cors_allowed_origins))
    return DrainRequestBody(edge, max(MIN_DRAIN_BYTES, 8 * settings.max_request_bytes))


async def serve_api(app: ASGIApp, settings: Settings, *, edge: bool = True) -> None:
    """Serve until SIGTERM/SIGINT; cleartext HTTP/1.1 + h2c, or TLS with ALPN h2/http1.1.
    `edge=False`: `app` already has `edge_app` inside it, behind a layer that runs first."""
    served = edge_app(app, settings) if edge else app
    if settings.server == "pyvoy":
        await serve_in_envoy(served, settings)
        return
    context = tls_context(settings)
    fd_limit = raise_fd_limit()
    cap = connection_cap(settings.max_connections, fd_limit)
    config = _Config(context, cap)
    config.bind = [settings.listen]
    config.keep_alive_max_requests = 1 << 31
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    if context is not None:
        # hypercorn decides by these two whether its sockets speak TLS; the files are read above.
        config.certfile = str(settings.tls_cert)
        config.keyfile = str(settings.tls_key)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "metald listening on %s (%s; at most %d connections, %d open files)",
        settings.listen,
        "TLS" if context else "cleartext",
        cap,
        fd_limit,
    )
    await serve(served, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    log.info("metald stopped; VMs keep running and are re-adopted at the next start")


async def serve_in_envoy(app: ASGIApp, settings: Settings) -> None:
    """`server = pyvoy`: Envoy (this process) serves; until its lifespan ends (metald.api.pyvoy_host)."""
    if not inside_envoy():
        raise ConfigError("server = pyvoy serves `metald serve` and `metald gateway` from inside Envoy only")
    raise_fd_limit()
    log.info("metald listening on %s (cleartext, pyvoy)", settings.listen)
    await HOST.serve(app)
    log.info("metald stopped; VMs keep running and are re-adopted at the next start")
