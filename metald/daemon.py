"""The composition root: settings -> store, backend, network, service, API; then serve."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

from metald.agent.pool import GuestAgentPool
from metald.api.app import RootApp, Route
from metald.api.auth import Authenticator, build_host_authenticator
from metald.api.codec import CheckedProtoCodec, SnakeCaseJsonCodec
from metald.api.grpc_health import health_app
from metald.api.handlers import VmServiceHandler
from metald.api.health import HealthReporter
from metald.api.interceptor import AuthInterceptor, ErrorInterceptor
from metald.api.metrics import Metrics, StateCounts
from metald.api.openapi import render as render_openapi
from metald.api.pyvoy_host import enter_envoy
from metald.api.reflection import reflection_apps
from metald.api.rest import RestApi
from metald.api.serve import serve_api
from metald.api.status import ReferenceStatusMiddleware
from metald.assets import AssetResolver
from metald.backends.factory import build_backend
from metald.backends.qemu.agent import agent_connector
from metald.domain.model import Vm
from metald.domain.paging import PageTokens
from metald.domain.quotas import Quotas
from metald.domain.states import ACTIVE_STATES
from metald.domain.validation import Defaults, Limits
from metald.fleet.agent import HostAgent, HostIdentity
from metald.fleet.config import host_fleet_secret
from metald.fleet.db import FleetDb
from metald.gen.grpc.health.v1.health_connect import Health
from metald.gen.vmprovisioner.v1.vm_connect import VmService as VmServiceDesc
from metald.gen.vmprovisioner.v1.vm_connect import VmServiceASGIApplication
from metald.guestwork import GuestWork
from metald.logs import configure_logging
from metald.ports import AddressBook, CheckResult, Network, VmRecords
from metald.service import ServiceOptions, ServicePorts, VmService
from metald.settings import MIB, Settings
from metald.store.factory import open_store
from metald.tracing import Tracing
from metald.usecases import VmUseCases

log = logging.getLogger("metald")


def build_network(settings: Settings, addresses: AddressBook) -> Network | None:
    if not settings.network_enabled:
        return None
    from metald.network.manager import LinuxNetwork

    return LinuxNetwork(
        addresses,
        host_netns=settings.network_host_netns,
        ipv4_pool=settings.network_ipv4_pool,
        ipv6_pool=settings.network_ipv6_pool,
        allow_egress=settings.network_allow_egress,
        blocked_ports=(settings.host_port[1],),
        walls_check_seconds=settings.network_walls_check_seconds,
        egress_uplink=settings.network_egress_uplink,
    )


def service_options(settings: Settings) -> ServiceOptions:
    cores = os.cpu_count() or 1
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ServiceOptions(
        vms_dir=settings.paths.vms,
        limits=Limits(
            max_metadata_entries=settings.max_metadata_entries,
            max_kernel_args_length=settings.max_kernel_args_length,
        ),
        defaults=Defaults(vcpu_count=settings.default_vcpus, memory_bytes=settings.default_memory_mib * MIB),
        quotas=Quotas(
            max_vms_per_customer=settings.max_vms_per_customer,
            max_vcpus_per_customer=settings.max_vcpus_per_customer,
            max_memory_bytes_per_customer=settings.max_memory_mib_per_customer * MIB,
            max_vms=settings.max_vms,
            max_host_vcpus=int(cores * settings.vcpu_overcommit_ratio),
            max_host_memory_bytes=int(ram * settings.memory_overcommit_ratio),
        ),
        shutdown_timeout=settings.shutdown_timeout_seconds,
        boot_wait_timeout=settings.boot_wait_timeout_seconds,
        snapshots_dir=settings.paths.snapshots,
        max_snapshots_per_customer=settings.max_snapshots_per_customer,
        max_snapshot_bytes_per_customer=settings.max_snapshot_mib_per_customer * MIB,
        max_warm_pool_size=settings.max_warm_pool_size,
        pool_dir=settings.paths.pool,
    )


def build_app(
    *,
    usecases: VmUseCases,
    authenticator: Authenticator,
    metrics: Metrics,
    health: HealthReporter,
    counts: StateCounts,
    settings: Settings,
    tracing: Tracing,
) -> RootApp:
    """The API around any VmUseCases (a host's service, a fleet gateway): Connect, gRPC, gRPC-Web,
    REST, gRPC health, reflection, /health, /metrics and /openapi.json."""
    connect_app = VmServiceASGIApplication(
        VmServiceHandler(usecases),
        interceptors=tracing.around([AuthInterceptor(authenticator, metrics), ErrorInterceptor()]),
        read_max_bytes=settings.max_request_bytes,
        codecs=[CheckedProtoCodec(), SnakeCaseJsonCodec()],
    )
    vm_app = ReferenceStatusMiddleware(connect_app)
    rest = RestApi(
        rpc_app=vm_app,
        authenticator=authenticator,
        usecases=usecases,
        max_request_bytes=settings.max_request_bytes,
    )
    return RootApp(
        routes=[
            Route.service(connect_app, vm_app),
            Route.service(health_app(health, [VmServiceDesc.desc().type_name])),
            *map(Route.service, reflection_apps(VmServiceDesc.desc(), Health.desc())),
            Route("/v1/", rest),
        ],
        health=health,
        metrics=metrics,
        store=counts,
        openapi=render_openapi().encode(),
        metrics_token=settings.metrics_token,
    )


def host_identity(settings: Settings) -> HostIdentity:
    quotas = service_options(settings).quotas
    return HostIdentity(
        settings.fleet_host_id,
        settings.fleet_advertise_url.rstrip("/"),
        quotas.max_host_vcpus,
        quotas.max_host_memory_bytes,
        quotas.max_vms,
    )


async def run(settings: Settings) -> None:
    enter_envoy(settings, "metald.daemon:run")  # server = pyvoy: this process becomes Envoy
    configure_logging(settings.log_format, settings.log_level)
    fleet_secret = host_fleet_secret(settings)
    authenticator = build_host_authenticator(settings, fleet_secret)
    settings.paths.vms.mkdir(parents=True, exist_ok=True)
    tracing = Tracing.from_env(os.environ)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(tracing.shutdown)
        store = await open_store(settings)
        stack.push_async_callback(store.close)
        backend = await build_backend(settings)
        stack.push_async_callback(backend.close)
        network = build_network(settings, store.addresses)
        metrics = Metrics()
        guest_work = None
        if backend.capabilities.backend_type == "qemu":  # Firecracker guests have no agent channel yet
            agent = GuestAgentPool(agent_connector(settings.paths.vms))
            stack.push_async_callback(agent.close)
            guest_work = GuestWork(
                store.vms,
                agent,
                default_timeout=settings.exec_default_timeout_seconds,
                max_timeout=settings.exec_max_timeout_seconds,
            )
        service = VmService(
            ports=ServicePorts(
                store=tracing.port(store.vms, "store"),
                event_log=store.events,
                backend=tracing.port(backend, "backend"),
                network=tracing.port(network, "network"),
                assets=AssetResolver(settings.assets_root, private=settings.paths),
                page_tokens=PageTokens(await store.secrets.secret("page_token_key", os.urandom(32))),
                events=metrics,
                options=service_options(settings),
                snapshots=store.snapshots,
                guest_work=guest_work,
            )
        )
        stack.push_async_callback(service.close_pools)  # before the backend's close: holders too
        await service.recover()
        checks: dict[str, Callable[[], Awaitable[CheckResult]]] = {
            "backend_ping": backend.ping,
            "store": store.ping,
        }
        if network is not None:
            checks["network"] = network.ping
        if backend.capabilities.supports_warm_pool:
            checks["warm_pool"] = service.warm_pool_check
            metrics.watch_warm_pool(service.warm_pool_status)
        health = HealthReporter(
            backend_type=backend.capabilities.backend_type, checks=checks, data_dir=settings.data_dir
        )
        if fleet_secret is not None:
            fleet_agent = HostAgent(
                FleetDb(
                    settings.fleet_dsn, max_size=2, application_name=f"metald-host-{settings.fleet_host_id}"
                ),
                store.vms,
                host_identity(settings),
                heartbeat=settings.fleet_heartbeat_seconds,
                lease=settings.fleet_lease_seconds,
                snapshots=store.snapshots,
                events=store.events,
            )
            await fleet_agent.start()
            stack.push_async_callback(fleet_agent.close)
        app = build_app(
            usecases=service,
            authenticator=authenticator,
            metrics=metrics,
            health=health,
            counts=store.vms,
            settings=settings,
            tracing=tracing,
        )
        await serve_api(app, settings)
        if settings.stop_vms_on_exit:
            await stop_all_vms(service, store.vms, settings.shutdown_timeout_seconds)


async def stop_all_vms(service: VmService, store: VmRecords, timeout: float) -> None:
    """`--stop-vms-on-exit`: every running or paused VM is shut down (gracefully, then forced after
    `timeout`) before the daemon exits. By default a daemon leaves its VMs running (docs/operations.md)."""
    vms = [vm for vm in await store.all_vms() if vm.state in ACTIVE_STATES]

    async def stop(vm: Vm) -> None:
        try:
            await service.shutdown(vm.customer_id, vm.vm_id, force=False, timeout_seconds=timeout)
        except Exception:
            log.exception("could not stop %s at exit", vm.vm_id, extra={"vm_id": vm.vm_id})

    await asyncio.gather(*(stop(vm) for vm in vms))
    log.info("stopped %d VMs at exit (stop_vms_on_exit)", len(vms))
