"""The daemon's one ASGI application: Connect/gRPC/gRPC-Web plus the plain HTTP endpoints."""

from __future__ import annotations

from dataclasses import dataclass

from metald.api.asgi import ASGIApp, Receive, Scope, Send, send_bytes, send_json
from metald.api.health import HealthReporter
from metald.api.metrics import Metrics
from metald.ports import VmStore

CONTENT_TYPE_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Route:
    prefix: str
    app: ASGIApp


class RootApp:
    """Dispatches by path: exact plain endpoints first, then RPC service prefixes."""

    def __init__(
        self,
        *,
        rpc_routes: list[Route],
        health: HealthReporter,
        metrics: Metrics,
        store: VmStore,
    ) -> None:
        self._routes = rpc_routes
        self._health = health
        self._metrics = metrics
        self._store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if path == "/health" and method in ("GET", "HEAD"):
            status, body = await self._health.report()
            await send_json(send, status, body)
            return
        if path == "/metrics" and method in ("GET", "HEAD"):
            await send_bytes(send, 200, await self._metrics.render(self._store), CONTENT_TYPE_PROMETHEUS)
            return
        for route in self._routes:
            if path.startswith(route.prefix):
                await route.app(scope, receive, send)
                return
        await send_json(send, 404, {"code": "not_found", "message": f"no such endpoint: {path}"})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
