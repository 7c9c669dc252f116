"""The composition root: settings -> store, backend, network, service, API; then serve."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

from metald.api.app import RootApp, Route
from metald.api.auth import build_authenticator
from metald.api.codec import CheckedProtoCodec, SnakeCaseJsonCodec
from metald.api.grpc_health import health_app
from metald.api.handlers import VmServiceHandler
from metald.api.health import HealthReporter
from metald.api.interceptor import AuthInterceptor, ErrorInterceptor
from metald.api.metrics import Metrics
from metald.api.openapi import render as render_openapi
from metald.api.reflection import reflection_apps
from metald.api.rest import RestApi
from metald.api.serve import serve_api
from metald.api.status import ReferenceStatusMiddleware
from metald.assets import AssetResolver
from metald.backends.factory import build_backend
from metald.domain.paging import PageTokens
from metald.domain.quotas import Quotas
from metald.domain.validation import Defaults, Limits
from metald.gen.grpc.health.v1.health_connect import Health
from metald.gen.vmprovisioner.v1.vm_connect import VmService as VmServiceDesc
from metald.gen.vmprovisioner.v1.vm_connect import VmServiceASGIApplication
from metald.logs import configure_logging
from metald.ports import CheckResult, Network
from metald.service import ServiceOptions, VmService
from metald.settings import MIB, Settings
from metald.store.sqlite import SqliteStore
from metald.tracing import Tracing

log = logging.getLogger("metald")


def build_network(settings: Settings, store: SqliteStore) -> Network | None:
    if not settings.network_enabled:
        return None
    from metald.network.manager import LinuxNetwork

    return LinuxNetwork(
        store,
        host_netns=settings.network_host_netns,
        ipv4_pool=settings.network_ipv4_pool,
        ipv6_pool=settings.network_ipv6_pool,
        allow_egress=settings.network_allow_egress,
        blocked_ports=(settings.host_port[1],),
    )


def service_options(settings: Settings) -> ServiceOptions:
    cores = os.cpu_count() or 1
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ServiceOptions(
        vms_dir=settings.vms_dir,
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
    )


async def run(settings: Settings) -> None:
    configure_logging(settings.log_format, settings.log_level)
    authenticator = build_authenticator(settings)
    settings.vms_dir.mkdir(parents=True, exist_ok=True)
    tracing = Tracing.from_env(os.environ)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(tracing.shutdown)
        store = await SqliteStore.open(settings.db_path)
        stack.push_async_callback(store.close)
        backend = await build_backend(settings)
        stack.push_async_callback(backend.close)
        network = build_network(settings, store)
        metrics = Metrics()
        service = VmService(
            store=tracing.port(store, "store"),
            backend=tracing.port(backend, "backend"),
            network=tracing.port(network, "network"),
            assets=AssetResolver(settings.assets_root, private=(settings.vms_dir, settings.db_path)),
            page_tokens=PageTokens(await store.secret("page_token_key", os.urandom(32))),
            events=metrics,
            options=service_options(settings),
        )
        await service.recover()
        checks: dict[str, Callable[[], Awaitable[CheckResult]]] = {
            "backend_ping": backend.ping,
            "store": store.ping,
        }
        if network is not None:
            checks["network"] = network.ping
        connect_app = VmServiceASGIApplication(
            VmServiceHandler(service),
            interceptors=tracing.around([AuthInterceptor(authenticator, metrics), ErrorInterceptor()]),
            read_max_bytes=settings.max_request_bytes,
            codecs=[CheckedProtoCodec(), SnakeCaseJsonCodec()],
        )
        health = HealthReporter(
            backend_type=backend.capabilities.backend_type, checks=checks, data_dir=settings.data_dir
        )
        vm_app = ReferenceStatusMiddleware(connect_app)
        rest = RestApi(
            rpc_app=vm_app,
            authenticator=authenticator,
            usecases=service,
            max_request_bytes=settings.max_request_bytes,
        )
        app = RootApp(
            routes=[
                Route.service(connect_app, vm_app),
                Route.service(health_app(health, [VmServiceDesc.desc().type_name])),
                *map(Route.service, reflection_apps(VmServiceDesc.desc(), Health.desc())),
                Route("/v1/", rest),
            ],
            health=health,
            metrics=metrics,
            store=store,
            openapi=render_openapi().encode(),
            metrics_token=settings.metrics_token,
        )
        await serve_api(app, settings)
