"""Hypercorn: one port for Connect, gRPC and gRPC-Web (HTTP/1.1 and HTTP/2), optionally TLS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl

from hypercorn.asyncio import serve
from hypercorn.config import Config

from metald.api.asgi import ASGIApp, Message, Receive, Scope, Send
from metald.api.auth import ConfigError, Peer, current_peer
from metald.settings import Settings

log = logging.getLogger("metald")

ALPN_PROTOCOLS = ["h2", "http/1.1"]
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # forward secret AEAD only (RFC 9113 9.2.2)
DRAIN_TIMEOUT = 5.0
# How much of a refused body is read and discarded so that the client sees the answer rather than
# a reset stream: well above what gRPC clients send by default (4 MiB), bounded by DRAIN_TIMEOUT.
MIN_DRAIN_BYTES = 64 * 1024 * 1024


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
    """Over HTTP/2, reads what is left of a request body before the response ends.

    hypercorn 0.18 drops the whole HTTP/2 connection (an unhandled KeyError, pgjones/hypercorn#329)
    when request DATA arrives for a stream whose response is already complete: exactly what happens
    when a call is refused before its body is read, as every UNAUTHENTICATED call is. Other calls
    multiplexed on that connection would die with it. It also lets a client that is still sending an
    oversized message read the RESOURCE_EXHAUSTED answer instead of a reset stream. At most
    `max_bytes` are drained, for at most DRAIN_TIMEOUT seconds; past that the response is sent anyway.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self._app = app
        self._max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("http_version") != "2":
            await self._app(scope, receive, send)
            return
        request_done = False
        trailers = False

        async def tracking_receive() -> Message:
            nonlocal request_done
            message = await receive()
            request_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def drain() -> None:
            drained = 0
            async with asyncio.timeout(DRAIN_TIMEOUT):
                while not request_done and drained <= self._max_bytes:
                    drained += len((await tracking_receive()).get("body", b""))

        async def draining_send(message: Message) -> None:
            nonlocal trailers
            kind = message["type"]
            if kind == "http.response.start":
                trailers = bool(message.get("trailers", False))
            last = (
                kind == "http.response.body" and not message.get("more_body", False) and not trailers
            ) or (kind == "http.response.trailers" and not message.get("more_trailers", False))
            if last and not request_done:
                with contextlib.suppress(TimeoutError):
                    await drain()
            await send(message)

        await self._app(scope, tracking_receive, draining_send)


class _Config(Config):
    """hypercorn's Config, serving our own SSLContext instead of building one."""

    def __init__(self, context: ssl.SSLContext | None) -> None:
        super().__init__()
        self._context = context

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._context


async def serve_api(app: ASGIApp, settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT; cleartext HTTP/1.1 + h2c, or TLS with ALPN h2/http1.1."""
    context = tls_context(settings)
    config = _Config(context)
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
    log.info("metald listening on %s (%s)", settings.listen, "TLS" if context else "cleartext")
    await serve(
        DrainRequestBody(app, max(MIN_DRAIN_BYTES, 8 * settings.max_request_bytes)),  # type: ignore[arg-type]
        config,
        shutdown_trigger=stop.wait,
    )
    log.info("metald stopped; VMs keep running and are re-adopted at the next start")
