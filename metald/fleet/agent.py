"""The host's side of the fleet: register, renew the lease by heartbeat, and keep the fleet's
record of this host's VMs current. The host's own store stays the source of truth: while the
database is away the host runs on unchanged, and at the first heartbeat after, it writes all of
its records again (its own records win) and drops rows of VMs it no longer has."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime

from metald.domain.model import Vm
from metald.domain.states import VmState
from metald.fleet import inventory
from metald.fleet.db import FleetDb
from metald.fleet.inventory import HostCapacity
from metald.ports import VmRecords

log = logging.getLogger("metald.fleet")

SWEEP_EVERY_BEATS = 6  # rows this host does not hold are looked for every few heartbeats
SWEEP_GRACE_SECONDS = 60.0  # ... and dropped when nobody touched them for this long


@dataclass(frozen=True)
class HostIdentity:
    host_id: str
    url: str
    vcpus_total: int
    memory_total: int
    vms_max: int


Fingerprint = tuple[str, VmState, datetime]


class HostAgent:
    def __init__(
        self, db: FleetDb, store: VmRecords, identity: HostIdentity, *, heartbeat: float, lease: float
    ) -> None:
        self._db = db
        self._store = store
        self._id = identity
        self._heartbeat = heartbeat
        self._lease = lease
        self._synced: dict[str, Fingerprint] | None = None  # as of the last full success; None: never
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
        capacity = HostCapacity(
            self._id.vcpus_total,
            self._id.memory_total,
            self._id.vms_max,
            sum(vm.config.vcpu_count for vm in vms),
            sum(vm.config.memory_bytes for vm in vms),
            len(vms),
        )
        await inventory.heartbeat(self._db, self._id.host_id, self._id.url, capacity, self._lease)
        current = {vm.vm_id: _fingerprint(vm) for vm in vms}
        previous = self._synced
        known = {} if self._resync or previous is None else previous
        changed = [vm for vm in vms if known.get(vm.vm_id) != current[vm.vm_id]]
        await inventory.upsert_vms(self._db, self._id.host_id, changed)
        if previous is not None:
            await inventory.remove_vms(self._db, self._id.host_id, [i for i in previous if i not in current])
        if previous is None or self._beats % SWEEP_EVERY_BEATS == 0:
            await inventory.sweep_vms(self._db, self._id.host_id, list(current), SWEEP_GRACE_SECONDS)
        self._synced = current
        self._resync = False
        self._beats += 1


def _fingerprint(vm: Vm) -> Fingerprint:
    return (vm.customer_id, vm.state, vm.updated_at)
