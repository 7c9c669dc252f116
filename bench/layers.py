"""Where a request's CPU goes, by layer of the stack, from py-spy's collapsed stacks.

Each sample is charged to one layer: walking its stack from the innermost frame outwards, the first
frame that belongs to a layer below decides. Frames of no layer (the standard library's json,
protobuf-py's message code, ...) are charged to the layer that called them: protobuf encoding
inside a codec is codec time, building messages in handlers.py or convert.py is conversion time.
Multiplying a layer's share by the measured CPU per request gives its cost per request.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

# (layer, prefixes of a frame's file path as py-spy prints it, relative to its sys.path entry, e.g.
# "asyncio/events.py", "metald/api/app.py"); the first rule that matches a frame wins.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("store read (SQLite via aiosqlite)", ("metald/store/", "aiosqlite/", "sqlite3/")),
    ("proto conversion", ("metald/api/convert.py", "metald/api/handlers.py")),
    ("backend runtime/metrics (QMP, /proc)", ("metald/backends/",)),
    ("process spawns (ip)", ("asyncio/subprocess.py", "asyncio/base_subprocess.py", "subprocess.py")),
    ("network (describe, counters)", ("metald/network/",)),
    ("use case (service, domain)", ("metald/service.py", "metald/domain/", "metald/usecases.py")),
    (
        "interceptors (auth, metrics, logging)",
        (
            "metald/api/interceptor.py",
            "metald/api/auth.py",
            "metald/api/metrics.py",
            "metald/logs.py",
            "prometheus_client/",
            "logging/",
            "uuid.py",
            "metald/tracing.py",
        ),
    ),
    ("codec", ("metald/api/codec.py", "connectrpc/codec.py", "connectrpc/_codec.py")),
    ("connectrpc plumbing", ("connectrpc/",)),
    (
        "metald middleware (RootApp, status, drain)",
        ("metald/api/app.py", "metald/api/status.py", "metald/api/serve"),
    ),
    ("server (hypercorn, h2, h11)", ("hypercorn/", "h2/", "hpack/", "h11/", "priority/", "pyvoy/")),
    ("event loop (asyncio)", ("asyncio/", "selectors.py", "threading.py", "concurrent/")),
)
OTHER = "other"
LAYERS = (*(name for name, _ in RULES), OTHER)


def layer_of(stack: list[str]) -> str:
    """The layer of one sample (frames root first, as py-spy writes them)."""
    for frame in reversed(stack):
        where = frame.partition(" (")[2]
        for layer, needles in RULES:
            if any(where.startswith(n) or f"/{n}" in where for n in needles):
                return layer
    return OTHER


def layer_shares(raw: str) -> dict[str, Any]:
    """{"samples": n, "pct": {layer: % of samples}} of py-spy's raw (collapsed) output."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[layer_of(stack.split(";"))] += int(count)
    total = sum(counts.values()) or 1
    return {
        "samples": sum(counts.values()),
        "pct": {layer: round(100 * counts[layer] / total, 1) for layer in LAYERS if counts[layer]},
    }
