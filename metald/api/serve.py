"""Hypercorn: one port for Connect, gRPC and gRPC-Web (HTTP/1.1 and HTTP/2), optionally TLS."""

from __future__ import annotations

import asyncio
import logging
import signal

from hypercorn.asyncio import serve
from hypercorn.config import Config

from metald.api.asgi import ASGIApp
from metald.settings import Settings

log = logging.getLogger("metald")


async def serve_api(app: ASGIApp, settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT; cleartext HTTP/1.1 + h2c, or TLS with ALPN h2/http1.1."""
    config = Config()
    config.bind = [settings.listen]
    config.keep_alive_max_requests = 1 << 31
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    if settings.tls_cert and settings.tls_key:
        config.certfile = str(settings.tls_cert)
        config.keyfile = str(settings.tls_key)
        if settings.tls_client_ca:
            config.ca_certs = str(settings.tls_client_ca)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("metald listening on %s", settings.listen)
    await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    log.info("metald stopped; VMs keep running and are re-adopted at the next start")
