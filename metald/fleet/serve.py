"""`metald gateway`: the stateless front door of a fleet, serving the same API as a host."""

from __future__ import annotations

import os
from contextlib import AsyncExitStack
from pathlib import Path

from metald.api.asgi import ASGIApp
from metald.api.auth import build_authenticator
from metald.api.health import HealthReporter
from metald.api.metrics import Metrics
from metald.api.pyvoy_host import enter_envoy
from metald.api.serve import edge_app, serve_api
from metald.daemon import build_app, service_options
from metald.domain.paging import PageTokens
from metald.domain.quotas import Quotas
from metald.domain.states import VmState
from metald.fleet import inventory
from metald.fleet.config import gateway_fleet_secret
from metald.fleet.db import FleetDb
from metald.fleet.fastpath import FastForward
from metald.fleet.forward import HostClients
from metald.fleet.gateway import FleetGateway, GatewayOptions
from metald.fleet.gateway_snapshots import SnapshotQuota
from metald.fleet.metrics import FleetMetrics
from metald.fleet.operator import OperatorApi, load_operator_token
from metald.fleet.tokens import GatewayTokens, derive_key
from metald.logs import configure_logging
from metald.ports import CheckResult
from metald.settings import Settings
from metald.tracing import Tracing


class FleetCounts:
    """/metrics VM counts of the whole fleet."""

    def __init__(self, db: FleetDb) -> None:
        self._db = db

    async def state_counts(self) -> dict[tuple[str, VmState], int]:
        return await inventory.state_counts(self._db)


def gateway_options(settings: Settings) -> GatewayOptions:
    host = service_options(settings)
    q = host.quotas
    customer_only = Quotas(q.max_vms_per_customer, q.max_vcpus_per_customer, q.max_memory_bytes_per_customer)
    snapshots = SnapshotQuota(host.max_snapshots_per_customer, host.max_snapshot_bytes_per_customer)
    return GatewayOptions(host.limits, host.defaults, customer_only, snapshots)


async def run_gateway(settings: Settings) -> None:
    enter_envoy(settings, "metald.fleet.serve:run_gateway")  # server = pyvoy: this process becomes Envoy
    configure_logging(settings.log_format, settings.log_level)
    secret = gateway_fleet_secret(settings)
    operator_token = load_operator_token(settings.fleet_operator_token_file)
    authenticator = build_authenticator(settings)
    tracing = Tracing.from_env(os.environ)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(tracing.shutdown)
        db = FleetDb(settings.fleet_dsn, max_size=8, application_name="metald-gateway")
        await db.open()
        stack.push_async_callback(db.close)
        metrics = Metrics()
        fleet_metrics = FleetMetrics(metrics.registry)
        hosts = HostClients(GatewayTokens(secret), fleet_metrics)
        stack.push_async_callback(hosts.close)
        gateway = FleetGateway(
            db, hosts, PageTokens(derive_key(secret, "page-token")), gateway_options(settings), fleet_metrics
        )

        async def live_hosts() -> CheckResult:
            rows = await inventory.hosts(db)
            live = sum(h.live for h in rows)
            return CheckResult("healthy" if live else "unhealthy", f"{live} of {len(rows)} hosts live")

        health = HealthReporter(
            backend_type="fleet",
            checks={"backend_ping": live_hosts, "store": db.ping},
            data_dir=settings.data_dir if settings.data_dir.is_dir() else Path("/"),
        )
        app = build_app(
            usecases=gateway,
            authenticator=authenticator,
            metrics=metrics,
            health=health,
            counts=FleetCounts(db),
            settings=settings,
            tracing=tracing,
        )
        front: ASGIApp = OperatorApi(app, db, operator_token)
        if tracing.enabled:  # spans come from the full path's interceptors: no fast path
            await serve_api(front, settings)
            return
        # Outermost: the edge layers (body draining, CORS, gRPC wire) are for the full path only.
        full = edge_app(front, settings)
        fast = FastForward(full, gateway, hosts, authenticator, metrics, settings.max_request_bytes)
        stack.push_async_callback(fast.close)
        await serve_api(fast, settings, edge=False)
