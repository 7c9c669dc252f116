"""Prometheus metrics: the reference's names plus one family per RPC, VM states and backend ops."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from metald import __version__
from metald.domain.states import VmState
from metald.ports import WarmPoolStatus


class StateCounts(Protocol):
    """What /metrics reads VM counts from: a host's store, or the fleet inventory."""

    async def state_counts(self) -> dict[tuple[str, VmState], int]: ...


PREFIX = "unkey_metald"
# RPC name -> the metric stem: unkey_metald_vm_<stem>_{requests_total,failures_total,duration_seconds}
RPC_STEMS = {
    "CreateVm": "create",
    "BootVm": "boot",
    "ShutdownVm": "shutdown",
    "PauseVm": "pause",
    "ResumeVm": "resume",
    "RebootVm": "reboot",
    "DeleteVm": "delete",
    "GetVmInfo": "get_info",
    "ListVms": "list",
}
# The buckets of every metald latency series, the host's and the fleet gateway's (seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def latency_histogram(
    name: str, documentation: str, labels: Sequence[str], registry: CollectorRegistry
) -> Histogram:
    """`unkey_metald_<name>`: a latency series in seconds on LATENCY_BUCKETS."""
    return Histogram(f"{PREFIX}_{name}", documentation, labels, buckets=LATENCY_BUCKETS, registry=registry)


class Metrics:
    """Implements metald.ports.ServiceEvents and the per-RPC counters."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no `*_created` twin of each counter
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, fds
        PlatformCollector(registry=r)
        Info(f"{PREFIX}_build", "metald build", registry=r).info({"version": __version__})
        self._requests = {
            rpc: Counter(f"{PREFIX}_vm_{stem}_requests", f"{rpc} requests", registry=r)
            for rpc, stem in RPC_STEMS.items()
        }
        self._failures = {
            rpc: Counter(f"{PREFIX}_vm_{stem}_failures", f"{rpc} failures by code", ["code"], registry=r)
            for rpc, stem in RPC_STEMS.items()
        }
        self._durations = {
            rpc: latency_histogram(f"vm_{stem}_request_duration_seconds", f"{rpc} latency", (), r)
            for rpc, stem in RPC_STEMS.items()
        }
        self._boot = latency_histogram(
            "vm_boot_duration_seconds", "BootVm: from the request to a running VMM", ["backend"], r
        )
        self._backend_errors = Counter(
            f"{PREFIX}_backend_errors", "backend operations that failed", ["backend", "operation"], registry=r
        )
        self._backend_latency = latency_histogram(
            "backend_operation_duration_seconds", "backend operation latency", ["backend", "operation"], r
        )
        self._snapshot_pause = latency_histogram(
            "snapshot_pause_seconds",
            "SnapshotVm: how long the source guest's vCPUs were stopped",
            ["backend"],
            r,
        )
        self._exits = Counter(f"{PREFIX}_vm_exits", "VMMs that ended by themselves", ["reason"], registry=r)
        self._active = Gauge(f"{PREFIX}_active_vms", "VMs RUNNING or PAUSED", registry=r)
        self._by_state = Gauge(f"{PREFIX}_vms", "VMs by state", ["state"], registry=r)
        self._by_customer = Gauge(f"{PREFIX}_customer_vms", "VMs per customer", ["customer_id"], registry=r)

    # ---- RPCs ----
    def rpc_finished(self, rpc: str, code: str, seconds: float) -> None:
        if rpc not in self._requests:
            return
        self._requests[rpc].inc()
        self._durations[rpc].observe(seconds)
        if code != "ok":
            self._failures[rpc].labels(code=code).inc()

    # ---- ServiceEvents ----
    def boot_finished(self, backend_type: str, seconds: float) -> None:
        self._boot.labels(backend=backend_type).observe(seconds)

    def backend_error(self, backend_type: str, operation: str) -> None:
        self._backend_errors.labels(backend=backend_type, operation=operation).inc()

    def backend_operation(self, backend_type: str, operation: str, seconds: float) -> None:
        self._backend_latency.labels(backend=backend_type, operation=operation).observe(seconds)

    def vm_exited(self, reason: str) -> None:
        self._exits.labels(reason=reason).inc()

    def snapshot_taken(self, backend_type: str, paused_seconds: float) -> None:
        self._snapshot_pause.labels(backend=backend_type).observe(paused_seconds)

    def watch_warm_pool(self, status: Callable[[], WarmPoolStatus]) -> None:
        """Serve the warm pools' state (metald/service/pool.py) at every scrape."""
        self.registry.register(_WarmPoolCollector(status))

    # ---- scrape ----
    async def render(self, store: StateCounts, *, per_customer: bool = False) -> bytes:
        """The scrape. `unkey_metald_customer_vms` has samples only with `per_customer` (an
        authenticated scraper): customer ids are not for anyone who can reach the port."""
        counts = await store.state_counts()
        per_state = dict.fromkeys(VmState, 0)
        by_customer: dict[str, int] = {}
        for (customer, state), n in counts.items():
            per_state[state] += n
            by_customer[customer] = by_customer.get(customer, 0) + n
        for state, n in per_state.items():
            if state is not VmState.UNSPECIFIED:
                self._by_state.labels(state=state.api_name).set(n)
        self._by_customer.clear()
        for customer, n in by_customer.items() if per_customer else ():
            self._by_customer.labels(customer_id=customer).set(n)
        self._active.set(per_state[VmState.RUNNING] + per_state[VmState.PAUSED])
        return generate_latest(self.registry)


class _WarmPoolCollector(Collector):
    def __init__(self, status: Callable[[], WarmPoolStatus]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        s = self._status()
        slots = GaugeMetricFamily(f"{PREFIX}_warm_pool_slots", "warm pool slots by state", labels=["state"])
        slots.add_metric(["ready"], s.ready)
        slots.add_metric(["starting"], s.starting)
        yield slots
        yield GaugeMetricFamily(
            f"{PREFIX}_warm_pool_target_slots", "slots the snapshots ask for", value=s.target
        )
        yield GaugeMetricFamily(f"{PREFIX}_warm_pools", "snapshots with a warm pool", value=s.pools)
        yield CounterMetricFamily(f"{PREFIX}_warm_pool_hits", "clone boots that took a slot", value=s.hits)
        yield CounterMetricFamily(
            f"{PREFIX}_warm_pool_misses", "clone boots of a pooled snapshot without a slot", value=s.misses
        )
