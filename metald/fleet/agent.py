"""The host's side of the fleet: register, renew the lease by heartbeat, and keep the fleet's
record of this host's VMs and snapshots current. The host's own store stays the source of truth:
while the database is away the host runs on unchanged, and at the first heartbeat after, it writes
all of its records again (its own records win) and drops rows of records it no longer has."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Generic, TypeVar

from metald.domain.model import Vm
from metald.domain.snapshots import Snapshot
from metald.fleet import inventory, snapshot_rows
from metald.fleet.db import FleetDb
from metald.fleet.inventory import HostCapacity
from metald.ports import EventLog, SnapshotRecords, VmRecords

log = logging.getLogger("metald.fleet")

SWEEP_EVERY_BEATS = 6  # rows this host does not hold are looked for every few heartbeats
SWEEP_GRACE_SECONDS = 60.0  # ... and dropped when nobody touched them for this long

T = TypeVar("T")


@dataclass(frozen=True)
class HostIdentity:
    host_id: str
    url: str
    vcpus_total: int
    memory_total: int
    vms_max: int


@dataclass(frozen=True)
class RowKind(Generic[T]):
    """How one kind of record is written to the fleet tables, and which table and key it has there."""

    upsert: Callable[[FleetDb, str, Sequence[T]], Awaitable[None]]
    table: str
    key: str
    row: Callable[[T], tuple[str, Hashable]]  # its key, and what makes it worth writing again if changed


class Mirror(Generic[T]):
    """The fleet's copy of one kind of this host's records, written as they change."""

    def __init__(self, kind: RowKind[T]) -> None:
        self._kind = kind
        self._synced: dict[str, Hashable] | None = None  # as of the last success; None: never

    async def sync(
        self, db: FleetDb, host_id: str, listed: Sequence[T], *, resync: bool, sweep: bool
    ) -> None:
        records: dict[str, tuple[T, Hashable]] = {}
        for record in listed:
            key, mark = self._kind.row(record)
            records[key] = (record, mark)
        previous = self._synced
        known = {} if resync or previous is None else previous
        changed = [record for key, (record, mark) in records.items() if known.get(key) != mark]
        await self._kind.upsert(db, host_id, changed)
        if previous is not None:
            gone = [key for key in previous if key not in records]
            await inventory.remove_rows(db, self._kind.table, self._kind.key, host_id, gone)
        if previous is None or sweep:
            await inventory.sweep_rows(
                db, self._kind.table, self._kind.key, host_id, list(records), SWEEP_GRACE_SECONDS
            )
        self._synced = {key: mark for key, (_, mark) in records.items()}


def _vm_row(vm: Vm) -> tuple[str, Hashable]:
    return vm.vm_id, (vm.customer_id, vm.state, vm.updated_at)


def _snapshot_row(s: Snapshot) -> tuple[str, Hashable]:
    return s.snapshot_id, (s.customer_id, s.size_bytes, s.warm_pool_size)


VM_ROWS = RowKind[Vm](inventory.upsert_vms, "fleet_vms", "vm_id", _vm_row)
SNAPSHOT_ROWS = RowKind[Snapshot](
    snapshot_rows.upsert_snapshots, "fleet_snapshots", "snapshot_id", _snapshot_row
)


@dataclass
class HostAgent:
    db: FleetDb
    store: VmRecords
    identity: HostIdentity
    _: KW_ONLY
    heartbeat: float
    lease: float
    snapshots: SnapshotRecords | None = None
    events: EventLog | None = None
    _vms: Mirror[Vm] = field(init=False, default_factory=lambda: Mirror(VM_ROWS))
    _snapshot_rows: Mirror[Snapshot] = field(init=False, default_factory=lambda: Mirror(SNAPSHOT_ROWS))
    _resync: bool = field(init=False, default=True)  # write every record at the next beat (start, failure)
    _beats: int = field(init=False, default=0)
    _task: asyncio.Task[None] | None = field(init=False, default=None)

    async def start(self) -> None:
        await self.db.open()
        self._task = asyncio.create_task(self._run(), name="fleet-heartbeat")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.db.close()

    async def _run(self) -> None:
        connected = True
        while True:
            try:
                await self.sync_once()
                if not connected:
                    log.info("fleet database reachable again; records resynchronised")
                connected = True
            except Exception as exc:
                if connected:
                    log.warning("fleet heartbeat failed (%s); the host runs on and retries", exc)
                connected = False
                self._resync = True
            await asyncio.sleep(self.heartbeat)

    async def sync_once(self) -> None:
        vms = [vm for vm in await self.store.all_vms() if vm.pending != "creating"]
        snapshots = await self._listed_snapshots()
        capacity = HostCapacity(
            self.identity.vcpus_total,
            self.identity.memory_total,
            self.identity.vms_max,
            sum(vm.config.vcpu_count for vm in vms),
            sum(vm.config.memory_bytes for vm in vms),
            len(vms),
        )
        last_event = await self.events.last_seq() if self.events is not None else 0
        await inventory.heartbeat(
            self.db, self.identity.host_id, self.identity.url, capacity, self.lease, last_event
        )
        sweep = self._beats % SWEEP_EVERY_BEATS == 0
        await self._vms.sync(self.db, self.identity.host_id, vms, resync=self._resync, sweep=sweep)
        await self._snapshot_rows.sync(
            self.db, self.identity.host_id, snapshots, resync=self._resync, sweep=sweep
        )
        self._resync = False
        self._beats += 1

    async def _listed_snapshots(self) -> list[Snapshot]:
        """The snapshots ListSnapshots shows here: neither being written nor deleted."""
        if self.snapshots is None:
            return []
        return [s for s in await self.snapshots.all_snapshots() if not s.pending and not s.deleted]
