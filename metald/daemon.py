"""The composition root: settings -> store, backend, network, service, API; then serve."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

from connectrpc.codec import proto_binary_codec

from metald.api.app import RootApp, Route
from metald.api.auth import build_authenticator
from metald.api.codec import SnakeCaseJsonCodec
from metald.api.handlers import VmServiceHandler
from metald.api.health import HealthReporter
from metald.api.interceptor import AuthInterceptor, ErrorInterceptor
from metald.api.metrics import Metrics
from metald.api.serve import serve_api
from metald.api.status import ReferenceStatusMiddleware
from metald.assets import AssetResolver
from metald.domain.paging import PageTokens
from metald.domain.quotas import Quotas
from metald.domain.validation import Defaults, Limits
from metald.gen.vmprovisioner.v1.vm_connect import VmServiceASGIApplication
from metald.logs import configure_logging
from metald.ports import Backend, CheckResult, Network
from metald.service import ServiceOptions, VmService
from metald.settings import MIB, Settings
from metald.store.sqlite import SqliteStore

log = logging.getLogger("metald")


async def build_backend(settings: Settings) -> Backend:
    from metald.backends.qemu.backend import QemuBackend

    assets = settings.assets_root
    return QemuBackend(
        qemu_binary=settings.qemu_binary,
        qemu_img_binary=settings.qemu_img_binary,
        accel=settings.accel,
        state_dir=settings.data_dir,
        probe_kernel=assets / "vmlinux",
        probe_initrd=assets / "initrd",
        probe_rootfs=assets / "rootfs.ext4",
        vmm_uid=settings.vmm_uid,
        vmm_gid=settings.vmm_gid,
    )


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
    async with AsyncExitStack() as stack:
        store = await SqliteStore.open(settings.db_path)
        stack.push_async_callback(store.close)
        backend = await build_backend(settings)
        stack.push_async_callback(backend.close)
        network = build_network(settings, store)
        metrics = Metrics()
        service = VmService(
            store=store,
            backend=backend,
            network=network,
            assets=AssetResolver(settings.assets_root),
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
            interceptors=[AuthInterceptor(authenticator, metrics), ErrorInterceptor()],
            read_max_bytes=settings.max_request_bytes,
            codecs=[proto_binary_codec(), SnakeCaseJsonCodec()],
        )
        app = RootApp(
            rpc_routes=[Route("/vmprovisioner.v1.VmService/", ReferenceStatusMiddleware(connect_app))],
            health=HealthReporter(
                backend_type=backend.capabilities.backend_type, checks=checks, data_dir=settings.data_dir
            ),
            metrics=metrics,
            store=store,
        )
        await serve_api(app, settings)
