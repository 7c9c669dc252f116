"""A store in process memory, shipped for tests and throwaway daemons (`store = "memory"`).

Behaves as the SQLite store does (the contract suite in tests/store runs both): unique ids,
seq order never reused, listing hides VMs still being created, events with their change,
retention. Nothing survives the process. Records are copied in and out, as a database would.
"""

from __future__ import annotations

import copy
import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from metald.domain.events import VmEvent
from metald.domain.model import Vm
from metald.domain.snapshots import PENDING_CREATING, Snapshot
from metald.domain.states import VmState
from metald.ports import CheckResult, EventRetention

PRUNE_EVERY = 128


class MemoryEventLog:
    def __init__(self, retention: EventRetention) -> None:
        self._retention = retention
        self._events: dict[int, VmEvent] = {}  # insertion order is seq order
        self._seqs = itertools.count(1)
        self._last = 0

    def append(self, event: VmEvent) -> int:
        seq = self._last = next(self._seqs)
        self._events[seq] = replace(event, seq=seq)
        if seq % PRUNE_EVERY == 0:
            self._prune()
        return seq

    async def events_after(self, customer_id: str, after_seq: int, limit: int) -> list[VmEvent]:
        found: list[VmEvent] = []
        for seq, event in self._events.items():
            if seq > after_seq and event.customer_id == customer_id:
                found.append(event)
                if len(found) == limit:
                    break
        return found

    async def first_seq(self) -> int:
        return next(iter(self._events), 0)

    async def last_seq(self) -> int:
        return self._last

    async def prune(self) -> int:
        return self._prune()

    def _prune(self) -> int:
        """Drop the oldest events beyond the count or age; the newest event is always kept."""
        cutoff = None
        if self._retention.max_age_seconds > 0:
            cutoff = datetime.now(UTC) - timedelta(seconds=self._retention.max_age_seconds)
        dropped = 0
        for seq in list(self._events):
            event = self._events[seq]
            beyond_count = seq <= self._last - self._retention.count
            too_old = cutoff is not None and event.at < cutoff
            if seq == self._last or not (beyond_count or too_old):
                break
            del self._events[seq]
            dropped += 1
        return dropped


class MemoryVmRecords:
    def __init__(self, events: MemoryEventLog) -> None:
        self._events = events
        self._vms: dict[str, Vm] = {}
        self._seqs = itertools.count(1)

    async def insert(self, vm: Vm, event: VmEvent) -> Vm:
        if vm.vm_id in self._vms:
            raise KeyError(vm.vm_id)
        vm.seq = next(self._seqs)
        self._vms[vm.vm_id] = copy.copy(vm)
        self._events.append(event)
        return vm

    async def get(self, vm_id: str) -> Vm | None:
        vm = self._vms.get(vm_id)
        return copy.copy(vm) if vm else None

    async def save(self, vm: Vm, event: VmEvent | None = None) -> None:
        stored = self._vms.get(vm.vm_id)
        if stored is None:
            return
        stored.state, stored.nics, stored.shutdown_reason = vm.state, vm.nics, vm.shutdown_reason
        stored.pending, stored.updated_at = vm.pending, vm.updated_at
        if event is not None:
            self._events.append(event)

    async def delete(self, vm_id: str, event: VmEvent | None = None) -> None:
        if self._vms.pop(vm_id, None) is not None and event is not None:
            self._events.append(event)

    def _listed(self, customer_id: str, states: Sequence[VmState]) -> list[Vm]:
        """Same filter as SQLite's: the customer's VMs in `states`, none still being created."""
        return [
            vm
            for vm in self._vms.values()
            if vm.customer_id == customer_id
            and vm.pending != "creating"
            and (not states or vm.state in states)
        ]

    async def list_page(
        self, customer_id: str, states: Sequence[VmState], after_seq: int, limit: int
    ) -> list[Vm]:
        rows = sorted((vm for vm in self._listed(customer_id, states) if vm.seq > after_seq), key=_seq)
        return [copy.copy(vm) for vm in rows[:limit]]

    async def count(self, customer_id: str, states: Sequence[VmState]) -> int:
        return len(self._listed(customer_id, states))

    async def all_vms(self) -> list[Vm]:
        return [copy.copy(vm) for vm in sorted(self._vms.values(), key=_seq)]

    async def state_counts(self) -> dict[tuple[str, VmState], int]:
        counts: defaultdict[tuple[str, VmState], int] = defaultdict(int)
        for vm in self._vms.values():
            counts[(vm.customer_id, vm.state)] += 1
        return dict(counts)

    async def usage(self, customer_id: str | None, states: Sequence[VmState] = ()) -> tuple[int, int, int]:
        vms = [
            vm
            for vm in self._vms.values()
            if (customer_id is None or vm.customer_id == customer_id) and (not states or vm.state in states)
        ]
        return len(vms), sum(vm.config.vcpu_count for vm in vms), sum(vm.config.memory_bytes for vm in vms)

    def clones_of(self, snapshot_id: str) -> int:
        return sum(vm.snapshot_id == snapshot_id for vm in self._vms.values())


def _seq(vm: Vm) -> int:
    return vm.seq


class MemorySnapshotRecords:
    def __init__(self, vms: MemoryVmRecords) -> None:
        self._vms = vms
        self._snapshots: dict[str, Snapshot] = {}  # insertion order is seq order
        self._seqs = itertools.count(1)

    async def insert(self, snapshot: Snapshot) -> Snapshot:
        if snapshot.snapshot_id in self._snapshots:
            raise KeyError(snapshot.snapshot_id)
        snapshot.seq = next(self._seqs)
        self._snapshots[snapshot.snapshot_id] = copy.deepcopy(snapshot)
        return snapshot

    async def get(self, snapshot_id: str) -> Snapshot | None:
        snapshot = self._snapshots.get(snapshot_id)
        return copy.deepcopy(snapshot) if snapshot and not snapshot.deleted else None

    async def save(self, snapshot: Snapshot) -> None:
        if stored := self._snapshots.get(snapshot.snapshot_id):
            stored.size_bytes, stored.pending = snapshot.size_bytes, snapshot.pending
            stored.warm_pool_size = snapshot.warm_pool_size

    def _listed(self, customer_id: str) -> list[Snapshot]:
        return [
            s
            for s in self._snapshots.values()
            if s.customer_id == customer_id and not s.deleted and s.pending != PENDING_CREATING
        ]

    async def list_page(self, customer_id: str, after_seq: int, limit: int) -> list[Snapshot]:
        return [copy.deepcopy(s) for s in self._listed(customer_id) if s.seq > after_seq][:limit]

    async def count(self, customer_id: str) -> int:
        return len(self._listed(customer_id))

    async def usage(self, customer_id: str) -> tuple[int, int]:
        mine = [s for s in self._snapshots.values() if s.customer_id == customer_id and not s.deleted]
        return len(mine), sum(s.size_bytes for s in mine)

    async def mark_deleted(self, snapshot_id: str) -> None:
        if stored := self._snapshots.get(snapshot_id):
            stored.deleted = True

    async def clone_count(self, snapshot_id: str) -> int:
        return self._vms.clones_of(snapshot_id)

    async def unused_deleted(self) -> list[Snapshot]:
        return [
            copy.deepcopy(s)
            for s in self._snapshots.values()
            if s.deleted and not self._vms.clones_of(s.snapshot_id)
        ]

    async def purge(self, snapshot_id: str) -> None:
        self._snapshots.pop(snapshot_id, None)

    async def all_snapshots(self) -> list[Snapshot]:
        return [copy.deepcopy(s) for s in self._snapshots.values()]


class MemoryAddressBook:
    def __init__(self) -> None:
        self._pools: defaultdict[str, dict[str, str]] = defaultdict(dict)  # pool -> address -> owner
        self._owned: defaultdict[str, set[tuple[str, str]]] = defaultdict(set)  # owner -> claims

    async def claim_address(self, pool: str, address: str, owner: str) -> bool:
        if address in self._pools[pool]:
            return False
        self._pools[pool][address] = owner
        self._owned[owner].add((pool, address))
        return True

    async def used_addresses(self, pool: str) -> set[str]:
        return set(self._pools.get(pool, ()))

    async def release_addresses(self, owner: str) -> None:
        for pool, address in self._owned.pop(owner, set()):
            del self._pools[pool][address]


class MemorySecrets:
    def __init__(self) -> None:
        self._secrets: dict[str, bytes] = {}

    async def secret(self, name: str, make: bytes) -> bytes:
        return self._secrets.setdefault(name, make)


class MemoryStore:
    def __init__(self, retention: EventRetention | None = None) -> None:
        self.events = MemoryEventLog(retention or EventRetention())
        self.vms = MemoryVmRecords(self.events)
        self.addresses = MemoryAddressBook()
        self.secrets = MemorySecrets()
        self.snapshots = MemorySnapshotRecords(self.vms)

    async def ping(self) -> CheckResult:
        return CheckResult("healthy", "memory")

    async def close(self) -> None:
        return None
