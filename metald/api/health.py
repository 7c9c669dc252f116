"""GET /health: the reference's JSON from real checks.

Rules: `unhealthy` (HTTP 503) when the store or the backend fails its check; `degraded` (HTTP 200)
when only a secondary check fails (networking, free disk below 1 GiB); otherwise `healthy`.
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
CRITICAL_CHECKS = frozenset({"backend_ping", "store"})


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class HealthReporter:
    def __init__(
        self,
        *,
        backend_type: str,
        checks: Mapping[str, Callable[[], Awaitable[CheckResult]]],
        data_dir: Path,
    ) -> None:
        self._backend_type = backend_type
        self._checks: dict[str, Callable[[], Awaitable[CheckResult]]] = dict(checks)
        self._checks["disk"] = self._disk
        self._data_dir = data_dir
        self._started = time.monotonic()
        self._cpu_mark = (time.monotonic(), time.process_time())

    async def _disk(self) -> CheckResult:
        usage = await asyncio.to_thread(shutil.disk_usage, self._data_dir)
        free_mib = usage.free // (1 << 20)
        status = "healthy" if usage.free >= MIN_FREE_DISK_BYTES else "degraded"
        return CheckResult(status, f"{free_mib} MiB free in {self._data_dir}")

    async def _run(self, name: str, check: Callable[[], Awaitable[CheckResult]]) -> dict[str, Any]:
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(check(), timeout=5)
        except Exception as exc:
            result = CheckResult("unhealthy", f"{type(exc).__name__}: {exc}")
        return {
            "status": result.status,
            "duration_ms": round(result.duration_ms or (time.monotonic() - started) * 1000, 2),
            "timestamp": _now(),
            "detail": result.detail,
        }

    def _cpu_percent(self) -> float:
        wall, cpu = time.monotonic(), time.process_time()
        last_wall, last_cpu = self._cpu_mark
        self._cpu_mark = (wall, cpu)
        return round(100 * (cpu - last_cpu) / max(wall - last_wall, 1e-6), 1)

    async def report(self) -> tuple[int, dict[str, Any]]:
        names = list(self._checks)
        results = await asyncio.gather(*(self._run(n, self._checks[n]) for n in names))
        checks = dict(zip(names, results, strict=True))
        statuses = {n: c["status"] for n, c in checks.items()}
        if any(statuses[n] == "unhealthy" for n in CRITICAL_CHECKS if n in statuses):
            overall = "unhealthy"
        elif any(s != "healthy" for s in statuses.values()):
            overall = "degraded"
        else:
            overall = "healthy"
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
