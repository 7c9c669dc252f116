"""The host's side of the fleet: register, renew the lease by heartbeat, and keep the fleet's
record of this host's VMs and snapshots current. The host's own store stays the source of truth:
while the database is away the host runs on unchanged, and at the first heartbeat after, it writes
all of its records again (its own records win) and drops rows of records it no longer has."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
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
    """How one kind of record is written to, removed from and swept out of the fleet tables."""

    upsert: Callable[[FleetDb, str, Sequence[T]], Awaitable[None]]
    remove: Callable[[FleetDb, str, Sequence[str]], Awaitable[None]]
    sweep: Callable[[FleetDb, str, Sequence[str], float], Awaitable[None]]


class Mirror(Generic[T]):
    """The fleet's copy of one kind of this host's records, written as they change."""

    def __init__(self, kind: RowKind[T]) -> None:
        self._kind = kind
        self._synced: dict[str, Hashable] | None = None  # as of the last success; None: never

    async def sync(
        self, db: FleetDb, host_id: str, records: dict[str, tuple[T, Hashable]], *, resync: bool, sweep: bool
    ) -> None:
        previous = self._synced
        known = {} if resync or previous is None else previous
        changed = [record for key, (record, mark) in records.items() if known.get(key) != mark]
        await self._kind.upsert(db, host_id, changed)
        if previous is not None:
            await self._kind.remove(db, host_id, [key for key in previous if key not in records])
        if previous is None or sweep:
            await self._kind.sweep(db, host_id, list(records), SWEEP_GRACE_SECONDS)
        self._synced = {key: mark for key, (_, mark) in records.items()}


VM_ROWS = RowKind[Vm](inventory.upsert_vms, inventory.remove_vms, inventory.sweep_vms)
SNAPSHOT_ROWS = RowKind[Snapshot](
    snapshot_rows.upsert_snapshots, snapshot_rows.remove_snapshots, snapshot_rows.sweep_snapshots
)


class HostAgent:
    def __init__(
        self,
        db: FleetDb,
        store: VmRecords,
        identity: HostIdentity,
        *,
        heartbeat: float,
        lease: float,
        snapshots: SnapshotRecords | None = None,
        events: EventLog | None = None,
    ) -> None:
        self._db = db
        self._store = store
        self._snapshots = snapshots
        self._events = events
        self._id = identity
        self._heartbeat = heartbeat
        self._lease = lease
        self._vms = Mirror(VM_ROWS)
        self._snapshot_rows = Mirror(SNAPSHOT_ROWS)
        self._resync = True  # write every record at the next beat (start-up, after a failure)
        self._beats = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._db.open()
        self._task = asyncio.create_task(self._run(), name="fleet-heartbeat")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._db.close()

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
            await asyncio.sleep(self._heartbeat)

    async def sync_once(self) -> None:
        vms = [vm for vm in await self._store.all_vms() if vm.pending != "creating"]
        snapshots = await self._listed_snapshots()
        capacity = HostCapacity(
            self._id.vcpus_total,
            self._id.memory_total,
            self._id.vms_max,
            sum(vm.config.vcpu_count for vm in vms),
            sum(vm.config.memory_bytes for vm in vms),
            len(vms),
        )
        last_event = await self._events.last_seq() if self._events is not None else 0
        await inventory.heartbeat(self._db, self._id.host_id, self._id.url, capacity, self._lease, last_event)
        sweep = self._beats % SWEEP_EVERY_BEATS == 0
        await self._vms.sync(
            self._db,
            self._id.host_id,
            {vm.vm_id: (vm, (vm.customer_id, vm.state, vm.updated_at)) for vm in vms},
            resync=self._resync,
            sweep=sweep,
        )
        await self._snapshot_rows.sync(
            self._db,
            self._id.host_id,
            {s.snapshot_id: (s, (s.customer_id, s.size_bytes, s.warm_pool_size)) for s in snapshots},
            resync=self._resync,
            sweep=sweep,
        )
        self._resync = False
        self._beats += 1

    async def _listed_snapshots(self) -> list[Snapshot]:
        """The snapshots ListSnapshots shows here: neither being written nor deleted."""
        if self._snapshots is None:
            return []
        return [s for s in await self._snapshots.all_snapshots() if not s.pending and not s.deleted]
