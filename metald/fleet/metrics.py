"""The gateway's own Prometheus series: placements and forwarded calls, per host and outcome."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from metald.api.metrics import PREFIX, latency_histogram


class FleetMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._placements = Counter(
            f"{PREFIX}_fleet_placements",
            "CreateVm placements by chosen host and outcome",
            ["host_id", "outcome"],
            registry=registry,
        )
        self._forwards = latency_histogram(
            "fleet_forward_duration_seconds",
            "calls forwarded to hosts, by host and code",
            ["host_id", "code"],
            registry,
        )

    def placed(self, host_id: str, outcome: str) -> None:
        self._placements.labels(host_id=host_id or "none", outcome=outcome).inc()

    def forwarded(self, host_id: str, code: str, seconds: float) -> None:
        self._forwards.labels(host_id=host_id, code=code).observe(seconds)
