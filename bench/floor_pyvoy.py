"""The floor application as pyvoy loads it (`bench.floor_pyvoy:app`, inside Envoy's Python), built
from BENCH_FLOOR_RESPONSES (and BENCH_FLOOR_BARE=1 for connectrpc alone).

pyvoy 1.3 completes a `receive()` future even after the application cancelled it (connectrpc
watches receive() for a client disconnect during a streaming call, gRPC's included, and cancels
that watch when the call ends), which raises InvalidStateError inside pyvoy and logs a traceback
per gRPC call. `ShieldedReceive` hands the application a future of its own for each receive(): a
cancelled wait leaves pyvoy's future alone. (BENCH_FLOOR_SHIELD=0 serves without it.)
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from bench.floor_app import build_app
from metald.api.asgi import ASGIApp, Message, Receive, Scope, Send
from metald.logs import configure_logging


class ShieldedReceive:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def shielded() -> Message:
            return await asyncio.shield(receive())

        await self._app(scope, shielded if scope["type"] == "http" else receive, send)


configure_logging("json", "info")
_app = build_app(Path(os.environ["BENCH_FLOOR_RESPONSES"]), bare=os.environ.get("BENCH_FLOOR_BARE") == "1")
app = ShieldedReceive(_app) if os.environ.get("BENCH_FLOOR_SHIELD", "1") == "1" else _app
