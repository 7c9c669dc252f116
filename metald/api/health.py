"""GET /health: the reference's JSON from real checks (rules in docs/operations.md).

Rules: `unhealthy` (HTTP 503) when a critical check (the backend's ping, the store) fails;
`degraded` (HTTP 200) when only a secondary check is not healthy (networking, free disk below
1 GiB); otherwise `healthy`. A check that raises or takes longer than 5 s counts as unhealthy.
One evaluation is shared by all callers for `max_age` seconds, so /health, the gRPC health
service and its watchers cannot pile up checks.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from metald import __version__
from metald.ports import CheckResult

MIN_FREE_DISK_BYTES = 1 << 30
CHECK_TIMEOUT_SECONDS = 5.0
CRITICAL_CHECKS = frozenset({"backend_ping", "store"})
STATUSES = ("healthy", "degraded", "unhealthy")

Check = Callable[[], Awaitable[CheckResult]]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def overall_status(statuses: Mapping[str, str]) -> str:
    if any(statuses[n] == "unhealthy" for n in CRITICAL_CHECKS if n in statuses):
        return "unhealthy"
    if any(s != "healthy" for s in statuses.values()):
        return "degraded"
    return "healthy"


class HealthReporter:
    def __init__(
        self,
        *,
        backend_type: str,
        checks: Mapping[str, Check],
        data_dir: Path,
        max_age: float = 1.0,
    ) -> None:
        self._backend_type = backend_type
        self._checks: dict[str, Check] = dict(checks)
        self._checks["disk"] = self._disk
        self._data_dir = data_dir
        self._max_age = max_age
        self._started = time.monotonic()
        self._cpu_mark = (time.monotonic(), time.process_time())
        self._lock = asyncio.Lock()
        self._last: tuple[float, int, dict[str, Any]] | None = None

    async def _disk(self) -> CheckResult:
        usage = await asyncio.to_thread(shutil.disk_usage, self._data_dir)
        free_mib = usage.free // (1 << 20)
        status = "healthy" if usage.free >= MIN_FREE_DISK_BYTES else "degraded"
        return CheckResult(status, f"{free_mib} MiB free in {self._data_dir}")

    async def _run(self, check: Check) -> dict[str, Any]:
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(check(), timeout=CHECK_TIMEOUT_SECONDS)
        except Exception as exc:
            result = CheckResult("unhealthy", f"{type(exc).__name__}: {exc}")
        return {
            "status": result.status,
            "duration_ms": round((time.monotonic() - started) * 1000, 2),
            "timestamp": _now(),
            "detail": result.detail,
        }

    def _cpu_percent(self) -> float:
        wall, cpu = time.monotonic(), time.process_time()
        last_wall, last_cpu = self._cpu_mark
        self._cpu_mark = (wall, cpu)
        return round(100 * (cpu - last_cpu) / max(wall - last_wall, 1e-6), 1)

    async def report(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body): a fresh evaluation, or the last one if younger than max_age."""
        async with self._lock:
            if self._last is None or time.monotonic() - self._last[0] >= self._max_age:
                self._last = (time.monotonic(), *await self._evaluate())
            return self._last[1], self._last[2]

    async def status(self) -> str:
        """The overall status alone: healthy, degraded or unhealthy."""
        _, body = await self.report()
        return str(body["status"])

    async def _evaluate(self) -> tuple[int, dict[str, Any]]:
        names = list(self._checks)
        results = await asyncio.gather(*(self._run(self._checks[n]) for n in names))
        checks = dict(zip(names, results, strict=True))
        statuses = {n: c["status"] for n, c in checks.items()}
        overall = overall_status(statuses)
        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        body = {
            "status": overall,
            "timestamp": _now(),
            "version": __version__,
            "backend": {"type": self._backend_type, "status": statuses.get("backend_ping", "unhealthy")},
            "system": {
                "uptime_seconds": int(time.monotonic() - self._started),
                "memory_usage_mb": _current_rss_mb() or rss_kb // 1024,
                "cpu_usage_percent": self._cpu_percent(),
            },
            "checks": checks,
        }
        return (503 if overall == "unhealthy" else 200), body


def _current_rss_mb() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // (1 << 20)


def _check_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["status", "duration_ms", "timestamp"],
        "properties": {
            "status": {"type": "string", "enum": list(STATUSES)},
            "duration_ms": {"type": "number", "minimum": 0},
            "timestamp": {"type": "string", "format": "date-time"},
            "detail": {"type": "string"},
        },
        "additionalProperties": False,
    }


# The body above as JSON Schema, for the OpenAPI document and the tests.
HEALTH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status", "timestamp", "version", "backend", "system", "checks"],
    "properties": {
        "status": {"type": "string", "enum": list(STATUSES)},
        "timestamp": {"type": "string", "format": "date-time"},
        "version": {"type": "string"},
        "backend": {
            "type": "object",
            "required": ["type", "status"],
            "properties": {
                "type": {"type": "string"},
                "status": {"type": "string", "enum": list(STATUSES)},
            },
            "additionalProperties": False,
        },
        "system": {
            "type": "object",
            "required": ["uptime_seconds", "memory_usage_mb", "cpu_usage_percent"],
            "properties": {
                "uptime_seconds": {"type": "integer", "minimum": 0},
                "memory_usage_mb": {"type": "integer", "minimum": 0},
                "cpu_usage_percent": {"type": "number"},
            },
            "additionalProperties": False,
        },
        "checks": {
            "type": "object",
            "required": ["backend_ping", "store", "disk"],
            "additionalProperties": _check_schema(),
        },
    },
    "additionalProperties": False,
}
