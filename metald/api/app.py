"""The daemon's one ASGI application: Connect/gRPC/gRPC-Web services, REST under /v1/, and the
plain endpoints /health, /metrics and /openapi.json."""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import Any

from connectrpc.server import ConnectASGIApplication

from metald.api.asgi import ASGIApp, Receive, Scope, Send, send_bytes, send_json
from metald.api.health import HealthReporter
from metald.api.metrics import Metrics, StateCounts

CONTENT_TYPE_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Route:
    prefix: str
    app: ASGIApp

    @classmethod
    def service(cls, app: ConnectASGIApplication[Any], wrapped: ASGIApp | None = None) -> Route:
        """The route of a Connect service app (optionally served through a middleware)."""
        return cls(f"{app.path}/", wrapped or app)


@dataclass(frozen=True, kw_only=True)
class RootApp:
    """Dispatches by path: exact plain endpoints first, then route prefixes."""

    routes: list[Route]
    health: HealthReporter
    metrics: Metrics
    store: StateCounts
    openapi: bytes
    metrics_token: str = ""  # empty: per-customer series for no one

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if path == "/health" and method in ("GET", "HEAD"):
            status, body = await self.health.report()
            await send_json(send, status, body)
            return
        if path == "/metrics" and method in ("GET", "HEAD"):
            scrape = await self.metrics.render(self.store, per_customer=self._metrics_authorized(scope))
            await send_bytes(send, 200, scrape, CONTENT_TYPE_PROMETHEUS)
            return
        if path == "/openapi.json" and method in ("GET", "HEAD"):
            await send_bytes(send, 200, self.openapi, "application/json")
            return
        scope = _utf8_headers(scope)
        if _grpc_over_http1(scope):
            message = "gRPC needs HTTP/2 (use h2c prior knowledge or TLS with ALPN h2)"
            await send_json(send, 415, {"code": "invalid_argument", "message": message})
            return
        for route in self.routes:
            if path.startswith(route.prefix):
                await route.app(scope, receive, send)
                return
        if (service := _rpc_service(path)) is not None:
            await _unknown_service(send, service)
            return
        await send_json(send, 404, {"code": "not_found", "message": f"no such endpoint: {path}"})

    def _metrics_authorized(self, scope: Scope) -> bool:
        """Per-customer series only for a scraper presenting `metrics_token` (none when unset)."""
        if not self.metrics_token:
            return False
        given = next((v for k, v in scope.get("headers", []) if k.lower() == b"authorization"), b"")
        return hmac.compare_digest(bytes(given), f"Bearer {self.metrics_token}".encode())


_RPC_PATH = re.compile(r"^/([A-Za-z_][\w.]*\.[A-Za-z_]\w*)/[A-Za-z_]\w*$")


def _rpc_service(path: str) -> str | None:
    match = _RPC_PATH.match(path)
    return match.group(1) if match else None


async def _unknown_service(send: Send, service: str) -> None:
    """UNIMPLEMENTED, as for an unknown method: for Connect HTTP 404 (what connect clients read as
    unimplemented) with the code in the body; gRPC and gRPC-Web get grpc-status 12 from GrpcWire."""
    await send_json(send, 404, {"code": "unimplemented", "message": f"unknown service {service}"})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _utf8_headers(scope: Scope) -> Scope:
    """Header values that are not UTF-8 are read as Latin-1 (what HTTP allows) and re-encoded, so
    the RPC layer, which decodes strictly, sees an ordinary (and simply wrong) value."""
    headers = scope.get("headers", [])
    fixed = []
    changed = False
    for name, value in headers:
        try:
            value.decode()
        except UnicodeDecodeError:
            value = value.decode("latin-1").encode()
            changed = True
        fixed.append((name, value))
    return {**scope, "headers": fixed} if changed else scope


def _grpc_over_http1(scope: Scope) -> bool:
    if scope.get("http_version") == "2":
        return False
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-type":
            return value.startswith(b"application/grpc") and not value.startswith(b"application/grpc-web")
    return False
