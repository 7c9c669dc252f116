"""The gateway's own Prometheus series: placements (outcome per chosen host, and how long the
reservation took), forwarded calls per host and code, and the host watch streams held open."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from metald.api.metrics import PREFIX, latency_histogram


class FleetMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._placements = Counter(
            f"{PREFIX}_fleet_placements",
            "CreateVm placements by chosen host and outcome",
            ["host_id", "outcome"],
            registry=registry,
        )
        self._placement_seconds = latency_histogram(
            "fleet_placement_duration_seconds",
            "time to choose a host and reserve the VM there in the fleet database",
            [],
            registry,
        )
        self._forwards = latency_histogram(
            "fleet_forward_duration_seconds",
            "calls forwarded to hosts, by host and code",
            ["host_id", "code"],
            registry,
        )
        self._watches = Gauge(
            f"{PREFIX}_fleet_watch_streams",
            "WatchVms streams this gateway holds open to each host",
            ["host_id"],
            registry=registry,
        )

    def placed(self, host_id: str, outcome: str) -> None:
        self._placements.labels(host_id=host_id or "none", outcome=outcome).inc()

    def placement_took(self, seconds: float) -> None:
        self._placement_seconds.observe(seconds)

    def forwarded(self, host_id: str, code: str, seconds: float) -> None:
        self._forwards.labels(host_id=host_id, code=code).observe(seconds)

    def watch_opened(self, host_id: str) -> None:
        self._watches.labels(host_id=host_id).inc()

    def watch_closed(self, host_id: str) -> None:
        self._watches.labels(host_id=host_id).dec()
