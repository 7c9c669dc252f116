"""The fleet gateway's use cases: VmUseCases over many hosts. Creates are placed and reserved in
the fleet inventory, then sent to the chosen host (a clone: to its snapshot's host); by-id calls go
to the owning host; ListVms reads the fleet view (every host, one keyset order, last known states
of hosts that are down); snapshots and WatchVms are in gateway_snapshots.py and gateway_watch.py."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from metald.api.convert import config_from_proto, config_to_proto, from_message, state_from_proto
from metald.client import common
from metald.domain import ids
from metald.domain.clones import clone_config
from metald.domain.errors import (
    ErrorCode,
    MetaldError,
    customer_mismatch,
)
from metald.domain.model import Vm, VmConfig
from metald.domain.paging import PageTokens, vm_page
from metald.domain.quotas import Quotas, Usage, check_boot
from metald.domain.states import ACTIVE_STATES, VmState
from metald.domain.validation import Defaults, Limits, validate_config, with_defaults
from metald.fleet import inventory
from metald.fleet.db import FleetDb
from metald.fleet.forward import HostClients
from metald.fleet.gateway_snapshots import FleetSnapshots, SnapshotQuota
from metald.fleet.gateway_watch import FleetWatch
from metald.fleet.inventory import VmLocation
from metald.fleet.metrics import FleetMetrics
from metald.fleet.placement import host_unavailable, reserve
from metald.fleet.routes import Routes, is_stale
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.ports import InterfaceInfo, NetworkAttachment, VmMetrics
from metald.usecases import (
    ConsoleChunk,
    ExecCommand,
    ExecResult,
    GuestFile,
    Page,
    SnapshotPage,
    SnapshotTaken,
    VmDetails,
    WatchItem,
)

log = logging.getLogger("metald.fleet")
R = TypeVar("R")
# Outcomes of a forwarded create after which the VM may exist on the host: keep the reservation
# (a retry with the same vm_id finishes it there; the host's sweep drops it if it never arrived).
_UNKNOWN_OUTCOME = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.INTERNAL})


@dataclass(frozen=True)
class GatewayOptions:
    limits: Limits
    defaults: Defaults
    quotas: Quotas  # per-customer limits only: they hold fleet-wide
    snapshot_quota: SnapshotQuota = field(default_factory=SnapshotQuota)  # fleet-wide too


def _datetime(value: Timestamp | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    return datetime.fromtimestamp(value.seconds + value.nanos / 1e9, UTC)


class FleetGateway:
    def __init__(
        self,
        db: FleetDb,
        hosts: HostClients,
        page_tokens: PageTokens,
        options: GatewayOptions,
        metrics: FleetMetrics,
    ) -> None:
        self._db = db
        self._hosts = hosts
        self._tokens = page_tokens
        self._opts = options
        self._metrics = metrics
        self._snapshots = FleetSnapshots(db, hosts, page_tokens, options.snapshot_quota)
        self._watch = FleetWatch(db, hosts)
        self._routes = Routes(db)

    # ---- routing -------------------------------------------------------------------------------

    async def _route(self, customer_id: str, vm_id: str, *, fresh: bool) -> tuple[VmLocation, bool]:
        location, cached = await self._routes.locate(customer_id, vm_id, fresh=fresh)
        if not location.host_live:
            raise host_unavailable(location.host_id, vm_id)
        return location, cached

    async def _on_host(
        self,
        customer_id: str,
        vm_id: str,
        send: Callable[[VmLocation], Awaitable[R]],
        *,
        fresh: bool = False,
        deletes: bool = False,
    ) -> tuple[VmLocation, R]:
        """`send` to the VM's host (routes.py: from the location cache when it holds the VM); a
        cached location the host disowns is dropped and the call tried once from the database."""
        location, cached = await self._route(customer_id, vm_id, fresh=fresh)
        try:
            result = await send(location)
        except MetaldError as exc:
            if not is_stale(exc):
                raise
            self._routes.forget(vm_id)
            if not cached:
                raise
            location, _ = await self._route(customer_id, vm_id, fresh=True)
            result = await send(location)
        if deletes:
            self._routes.forget(vm_id)
        else:
            self._routes.confirmed(location)
        return location, result

    async def _note_state(self, location: VmLocation, state: VmState) -> None:
        """Keep the fleet view current at once (the host's own sync would within a heartbeat)."""
        with contextlib.suppress(MetaldError):
            await inventory.set_state(self._db, location.vm_id, location.host_id, state)

    async def _forward(
        self, location: VmLocation, customer_id: str, rpc: str, request: Any, **kw: Any
    ) -> Any:
        client = self._hosts.rpc(location.url)
        return await self._hosts.call(location.host_id, customer_id, getattr(client, rpc), request, **kw)

    async def _lifecycle(
        self, customer_id: str, vm_id: str, rpc: str, request: Any, timeout: float = 60.0
    ) -> Vm:
        location, response = await self._on_host(
            customer_id, vm_id, lambda at: self._forward(at, customer_id, rpc, request, timeout=timeout)
        )
        state = state_from_proto(response.state)
        self._routes.confirmed(location, state)
        await self._note_state(location, state)
        now = datetime.now(UTC)
        return Vm(vm_id, customer_id, VmConfig(), state, now, now)

    @property
    def routes(self) -> Routes:
        return self._routes

    async def seen_info(self, location: VmLocation, state: pb.VmState) -> None:
        """The host answered GetVmInfo with `state`: cache it, and note it in the fleet view if new."""
        seen = state_from_proto(state)
        if seen != location.state:
            self._routes.confirmed(location, seen)
            await self._note_state(location, seen)

    # ---- use cases -----------------------------------------------------------------------------

    async def create(
        self, customer_id: str, vm_id: str, config: VmConfig, claimed_customer: str, snapshot_id: str = ""
    ) -> Vm:
        if claimed_customer and claimed_customer != customer_id:
            raise customer_mismatch(customer_id)
        vm_id = ids.check_vm_id(vm_id) if vm_id else ids.new_vm_id()
        machine, on_host = config, ""
        if snapshot_id:  # a clone: the snapshot's machine, on the snapshot's host
            source = await self._snapshots.clone_source(customer_id, snapshot_id)
            machine, on_host = clone_config(config, source.config), source.host_id
        validate_config(machine, self._opts.limits)
        now = datetime.now(UTC)
        sized = Vm(
            vm_id, customer_id, with_defaults(machine, self._opts.defaults), VmState.CREATED, now, now,
            snapshot_id=snapshot_id,
        )  # fmt: skip
        started = time.monotonic()
        try:
            placement = await reserve(self._db, sized, self._opts.quotas, on_host)
        except MetaldError as exc:
            self._metrics.placed(on_host, exc.reason.lower() or exc.code.value)
            raise
        finally:
            self._metrics.placement_took(time.monotonic() - started)
        location = VmLocation(vm_id, customer_id, placement.host_id, placement.url, True, True)
        request = pb.CreateVmRequest(vm_id=vm_id, config=config_to_proto(config), snapshot_id=snapshot_id)
        try:
            response = await self._forward(location, customer_id, "create_vm", request)
        except MetaldError as exc:
            self._metrics.placed(placement.host_id, exc.code.value)
            if exc.code not in _UNKNOWN_OUTCOME and exc.reason != "VM_EXISTS":
                with contextlib.suppress(MetaldError):  # it was refused: nothing to keep
                    await inventory.forget_reservation(self._db, vm_id, placement.host_id)
            raise
        self._metrics.placed(placement.host_id, "retried" if placement.retried else "placed")
        state = state_from_proto(response.state)
        self._routes.confirmed(location, state)
        await self._note_state(location, state)
        return replace(sized, state=state)

    async def boot(self, customer_id: str, vm_id: str, *, wait_for_ready: bool, wait_timeout: float) -> Vm:
        location, _ = await self._route(customer_id, vm_id, fresh=True)  # the quota needs its state
        if location.state not in ACTIVE_STATES:
            await self._check_boot_quota(customer_id, location)
        request = pb.BootVmRequest(
            vm_id=vm_id, wait_for_ready=wait_for_ready, wait_timeout_seconds=int(wait_timeout)
        )
        timeout = common.boot_timeout(wait_for_ready, int(wait_timeout), 60.0)
        return await self._lifecycle(customer_id, vm_id, "boot_vm", request, timeout)

    async def _check_boot_quota(self, customer_id: str, location: VmLocation) -> None:
        running = Usage(*await inventory.customer_usage(self._db, customer_id, sorted(ACTIVE_STATES)))
        check_boot(self._opts.quotas, running, Usage(0, 0, 0), location.vcpus, location.memory_bytes)

    async def pause(self, customer_id: str, vm_id: str) -> Vm:
        return await self._lifecycle(customer_id, vm_id, "pause_vm", pb.PauseVmRequest(vm_id=vm_id))

    async def resume(self, customer_id: str, vm_id: str) -> Vm:
        return await self._lifecycle(customer_id, vm_id, "resume_vm", pb.ResumeVmRequest(vm_id=vm_id))

    async def reboot(self, customer_id: str, vm_id: str, *, force: bool) -> Vm:
        request = pb.RebootVmRequest(vm_id=vm_id, force=force)
        return await self._lifecycle(customer_id, vm_id, "reboot_vm", request)

    async def shutdown(self, customer_id: str, vm_id: str, *, force: bool, timeout_seconds: float) -> Vm:
        request = pb.ShutdownVmRequest(vm_id=vm_id, force=force, timeout_seconds=int(timeout_seconds))
        timeout = common.shutdown_timeout(force, int(timeout_seconds), 60.0)
        return await self._lifecycle(customer_id, vm_id, "shutdown_vm", request, timeout)

    async def delete(self, customer_id: str, vm_id: str, *, force: bool) -> None:
        request = pb.DeleteVmRequest(vm_id=vm_id, force=force)
        location, _ = await self._on_host(
            customer_id, vm_id, lambda at: self._forward(at, customer_id, "delete_vm", request), deletes=True
        )
        with contextlib.suppress(MetaldError):
            await inventory.forget(self._db, vm_id, location.host_id)

    async def info(self, customer_id: str, vm_id: str) -> VmDetails:
        request = pb.GetVmInfoRequest(vm_id=vm_id)
        location, r = await self._on_host(
            customer_id, vm_id, lambda at: self._forward(at, customer_id, "get_vm_info", request)
        )
        created = _datetime(r.created_at)
        vm = Vm(vm_id, customer_id, config_from_proto(r.config), state_from_proto(r.state), created, created)
        metrics = from_message(r.metrics or pb.VmMetrics(), VmMetrics)
        network = None
        if r.network_info is not None:
            interfaces = tuple(from_message(i, InterfaceInfo) for i in r.network_info.interfaces)
            network = NetworkAttachment(r.network_info.namespace, (), interfaces)
        backend_info = {**r.backend_info, "host_id": location.host_id}
        await self.seen_info(location, r.state)
        return VmDetails(vm, backend_info.get("backend_type", ""), None, metrics, network, backend_info)

    async def list(
        self, customer_id: str, states: Sequence[VmState], page_size: int, page_token: str
    ) -> Page:
        page = vm_page(self._tokens, customer_id, states, page_size, page_token)
        rows, total = await inventory.list_page(self._db, customer_id, page.states, page.after, page.fetch)
        rows, token = page.cut(self._tokens, rows)
        return Page(rows, token, total)

    async def read_console(self, customer_id: str, vm_id: str, offset: int, limit: int) -> ConsoleChunk:
        _, chunk = await self._on_host(
            customer_id,
            vm_id,
            lambda at: self._hosts.console(at.host_id, at.url, customer_id, vm_id, offset, limit),
        )
        return chunk

    # ---- inside the guest: forwarded to the VM's host --------------------------------------------

    async def exec(self, customer_id: str, vm_id: str, command: ExecCommand) -> ExecResult:
        request = pb.ExecVmRequest(
            vm_id=vm_id,
            command=list(command.argv),
            env=dict(command.env),
            stdin=command.stdin,
            working_dir=command.working_dir,
            timeout_seconds=int(command.timeout_seconds),
        )
        timeout = (command.timeout_seconds or 3600.0) + 30.0
        _, r = await self._on_host(
            customer_id, vm_id, lambda at: self._forward(at, customer_id, "exec_vm", request, timeout=timeout)
        )
        return from_message(r, ExecResult)

    async def write_file(self, customer_id: str, vm_id: str, path: str, content: bytes, mode: int) -> None:
        request = pb.WriteFileRequest(vm_id=vm_id, path=path, content=content, mode=mode)
        await self._on_host(
            customer_id, vm_id, lambda at: self._forward(at, customer_id, "write_file", request)
        )

    async def read_file(self, customer_id: str, vm_id: str, path: str) -> GuestFile:
        request = pb.ReadFileRequest(vm_id=vm_id, path=path)
        _, r = await self._on_host(
            customer_id, vm_id, lambda at: self._forward(at, customer_id, "read_file", request)
        )
        return GuestFile(r.content, r.mode, r.size_bytes)

    # ---- snapshots and watches: gateway_snapshots.py, gateway_watch.py ----------------------------

    def watch(
        self, customer_id: str, states: Sequence[VmState], vm_ids: Sequence[str], after_cursor: str
    ) -> AsyncIterator[WatchItem]:
        return self._watch.watch(customer_id, states, vm_ids, after_cursor)

    async def snapshot(
        self, customer_id: str, vm_id: str, snapshot_id: str, metadata: dict[str, str], warm_pool_size: int
    ) -> SnapshotTaken:
        _, taken = await self._on_host(
            customer_id, vm_id, lambda at: self._snapshots.take(at, snapshot_id, metadata, warm_pool_size)
        )
        return taken

    async def list_snapshots(self, customer_id: str, page_size: int, page_token: str) -> SnapshotPage:
        return await self._snapshots.list(customer_id, page_size, page_token)

    async def delete_snapshot(self, customer_id: str, snapshot_id: str) -> None:
        await self._snapshots.delete(customer_id, snapshot_id)
