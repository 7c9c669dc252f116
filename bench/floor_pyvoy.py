"""The floor application as pyvoy loads it (`bench.floor_pyvoy:app`, inside Envoy's Python), built
from BENCH_FLOOR_RESPONSES (and BENCH_FLOOR_BARE=1 for connectrpc alone)."""

from __future__ import annotations

import os
from pathlib import Path

from bench.floor_app import build_app
from metald.logs import configure_logging

configure_logging("json", "info")
app = build_app(Path(os.environ["BENCH_FLOOR_RESPONSES"]), bare=os.environ.get("BENCH_FLOOR_BARE") == "1")
