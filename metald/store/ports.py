"""The store ports (metald/ports.py re-exports them): VM records, the address book, secrets, the
event log and snapshot records, each a small part of one Store. Adapters: metald/store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from metald.domain.events import VmEvent
from metald.domain.model import Vm
from metald.domain.snapshots import Snapshot
from metald.domain.states import VmState

if TYPE_CHECKING:  # metald.ports re-exports this module
    from metald.ports import CheckResult


class StoreFullError(Exception):
    """The store could not write (disk full, read-only): nothing was changed."""


class VmRecords(Protocol):
    """The VM records. Each change may carry the VmEvent describing it: the store writes both in
    one transaction (assigning the event's seq), so the event log misses nothing."""

    async def insert(self, vm: Vm, event: VmEvent) -> Vm:
        """Store a new VM and return it with `seq` set; raises KeyError if the id is taken."""

    async def get(self, vm_id: str) -> Vm | None: ...

    async def save(self, vm: Vm, event: VmEvent | None = None) -> None:
        """Persist state, nics, shutdown_reason, pending and updated_at of an existing VM."""

    async def delete(self, vm_id: str, event: VmEvent | None = None) -> None: ...

    async def list_page(
        self, customer_id: str, states: Sequence[VmState], after_seq: int, limit: int
    ) -> list[Vm]: ...

    async def count(self, customer_id: str, states: Sequence[VmState]) -> int: ...

    async def all_vms(self) -> list[Vm]: ...

    async def state_counts(self) -> dict[tuple[str, VmState], int]:
        """Number of VMs per (customer, state)."""

    async def usage(self, customer_id: str | None, states: Sequence[VmState] = ()) -> tuple[int, int, int]:
        """(VM count, total vCPUs, total memory bytes) of one customer (or the host if None),
        over VMs in `states` (all states if empty)."""


class AddressBook(Protocol):
    """Addresses handed out by IPAM: unique per (pool, address)."""

    async def claim_address(self, pool: str, address: str, owner: str) -> bool:
        """True if the address was free and is now the owner's."""

    async def used_addresses(self, pool: str) -> set[str]: ...

    async def release_addresses(self, owner: str) -> None: ...


class Secrets(Protocol):
    async def secret(self, name: str, make: bytes) -> bytes:
        """A persistent secret: the stored one, or `make` stored now."""


class SnapshotRecords(Protocol):
    """Snapshot records. Deleted ones are hidden from get/list/count/usage at once but kept
    (their files too) until the last clone is gone; then the service purges them."""

    async def insert(self, snapshot: Snapshot) -> Snapshot:
        """Store a new snapshot and return it with `seq` set; KeyError if the id was ever taken
        by a snapshot not yet purged."""

    async def get(self, snapshot_id: str) -> Snapshot | None:
        """The snapshot unless deleted (pending ones included, as for VMs)."""

    async def save(self, snapshot: Snapshot) -> None:
        """Persist size_bytes, pending and warm_pool_size of an existing snapshot."""

    async def list_page(self, customer_id: str, after_seq: int, limit: int) -> list[Snapshot]:
        """The customer's snapshots by seq, neither deleted nor still being created."""

    async def count(self, customer_id: str) -> int:
        """How many list_page would list in all."""

    async def usage(self, customer_id: str) -> tuple[int, int]:
        """(count, total size_bytes) of the customer's snapshots not deleted (pending included),
        for quotas."""

    async def mark_deleted(self, snapshot_id: str) -> None: ...

    async def clone_count(self, snapshot_id: str) -> int:
        """VMs whose snapshot_id is this one."""

    async def unused_deleted(self) -> list[Snapshot]:
        """Deleted snapshots no VM was cloned from any more: their files may go, then purge()."""

    async def purge(self, snapshot_id: str) -> None:
        """Forget the record for good (after its files are removed). Idempotent."""

    async def all_snapshots(self) -> list[Snapshot]:
        """Every record, deleted and pending included, by seq (recovery)."""


@dataclass(frozen=True)
class EventRetention:
    """How many events the log keeps (the newest `count`), and for how long (0: no age limit)."""

    count: int = 100_000
    max_age_seconds: float = 0.0


class EventLog(Protocol):
    """The VM events the records wrote, in seq order, pruned to the retention."""

    async def events_after(self, customer_id: str, after_seq: int, limit: int) -> list[VmEvent]:
        """That customer's events with seq > after_seq, ascending, at most `limit`."""

    async def first_seq(self) -> int:
        """The oldest kept seq (0 if none): a cursor below first_seq - 1 lost events to pruning."""

    async def last_seq(self) -> int:
        """The newest seq ever assigned (0 if none)."""

    async def prune(self) -> int:
        """Apply the retention now (the store also does on writes); returns how many were dropped."""


class Store(Protocol):
    """The parts of one store; each consumer gets only the part it needs."""

    @property
    def vms(self) -> VmRecords: ...

    @property
    def addresses(self) -> AddressBook: ...

    @property
    def secrets(self) -> Secrets: ...

    @property
    def events(self) -> EventLog: ...

    @property
    def snapshots(self) -> SnapshotRecords: ...

    async def ping(self) -> CheckResult: ...

    async def close(self) -> None: ...
