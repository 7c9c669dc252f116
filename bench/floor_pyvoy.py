"""The floor application as pyvoy loads it (`bench.floor_pyvoy:app`, inside Envoy's Python), built
from BENCH_FLOOR_RESPONSES (and BENCH_FLOOR_BARE=1 for connectrpc alone).

Each receive() is shielded as the daemon's `server = pyvoy` does (metald.api.pyvoy_host: pyvoy 1.3
completes receive() futures the application cancelled, a traceback per gRPC call otherwise);
BENCH_FLOOR_SHIELD=0 serves without it.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.floor_app import build_app
from metald.api.asgi import Receive, Scope, Send
from metald.api.pyvoy_host import shielded
from metald.logs import configure_logging

configure_logging("json", "info")
_app = build_app(Path(os.environ["BENCH_FLOOR_RESPONSES"]), bare=os.environ.get("BENCH_FLOOR_BARE") == "1")


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    shield = scope["type"] == "http" and os.environ.get("BENCH_FLOOR_SHIELD", "1") == "1"
    await _app(scope, shielded(receive) if shield else receive, send)
