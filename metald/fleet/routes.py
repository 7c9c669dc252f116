"""Where a gateway sends a by-id call, mostly without asking PostgreSQL.

- Locations: vm_id -> (customer, host, size, last state seen), filled only by a host's successful
  answer. A VM never moves host, so a location once confirmed stays true until the VM is deleted;
  a delete through this gateway drops it, and a NOT_FOUND (or VM_NOT_OWNED) from the host for a
  cached location drops it and the call is tried once more from the database (a VM deleted, or
  its id reused, through another gateway). A cached location is used only for the customer it was
  confirmed for; any other caller is answered from the database, as without the cache, and the
  host checks the customer in the gateway token either way.
- Hosts: the host table (url, time left on the lease) read at most every HOST_VIEW_SECONDS. The
  lease end is kept as a local monotonic deadline computed from the database's own clock, so a
  host whose lease lapses is down here at that moment even between reads.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

from metald.domain import ids
from metald.domain.errors import MetaldError
from metald.domain.ownership import owned
from metald.domain.states import VmState
from metald.fleet import inventory
from metald.fleet.db import FleetDb
from metald.fleet.inventory import VmLocation

HOST_VIEW_SECONDS = 1.0
MAX_LOCATIONS = 100_000
# What a host answers for a VM it does not hold for this customer: the cached location may be stale.
STALE_REASONS = frozenset({"VM_NOT_FOUND", "VM_NOT_OWNED"})


@dataclass(frozen=True)
class HostLease:
    url: str
    live_until: float  # time.monotonic() at which the lease, as last read, ends


def is_stale(exc: MetaldError) -> bool:
    """The host does not hold the VM for this customer (not, say, a file missing in the guest)."""
    return exc.reason in STALE_REASONS


class HostView:
    """The fleet's host table, read again when older than `max_age` seconds (one reader at a time)."""

    def __init__(self, db: FleetDb, max_age: float = HOST_VIEW_SECONDS) -> None:
        self._db = db
        self._max_age = max_age
        self._hosts: dict[str, HostLease] = {}
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self, host_id: str) -> HostLease | None:
        if time.monotonic() - self._read_at > self._max_age:
            async with self._lock:
                if time.monotonic() - self._read_at > self._max_age:
                    await self._read()
        return self._hosts.get(host_id)

    def peek(self, host_id: str) -> HostLease | None:
        """The host as last read, only while that read is fresh (never reads the database)."""
        if time.monotonic() - self._read_at > self._max_age:
            return None
        return self._hosts.get(host_id)

    async def _read(self) -> None:
        now = time.monotonic()
        self._hosts = {
            h.host_id: HostLease(h.url, now + h.lease_left_seconds) for h in await inventory.leases(self._db)
        }
        self._read_at = now


class LocationCache:
    """A bounded LRU of confirmed VM locations."""

    def __init__(self, max_size: int = MAX_LOCATIONS) -> None:
        self._max = max_size
        self._entries: OrderedDict[str, VmLocation] = OrderedDict()

    def get(self, vm_id: str) -> VmLocation | None:
        location = self._entries.get(vm_id)
        if location is not None:
            self._entries.move_to_end(vm_id)
        return location

    def put(self, location: VmLocation) -> None:
        self._entries[location.vm_id] = location
        self._entries.move_to_end(location.vm_id)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def drop(self, vm_id: str) -> None:
        self._entries.pop(vm_id, None)

    def __len__(self) -> int:
        return len(self._entries)


class Routes:
    def __init__(
        self, db: FleetDb, hosts: HostView | None = None, cache: LocationCache | None = None
    ) -> None:
        self._db = db
        self._hosts = hosts or HostView(db)
        self._cache = cache or LocationCache()

    async def locate(self, customer_id: str, vm_id: str, *, fresh: bool = False) -> tuple[VmLocation, bool]:
        """The caller's VM and whether it came from the cache (NOT_FOUND/VM_NOT_OWNED if not theirs);
        `host_live` as of now. `fresh` reads the database (for the VM's current state)."""
        cached = None if fresh else self._cache.get(vm_id)
        if cached is not None and cached.customer_id == customer_id:
            lease = await self._hosts.get(cached.host_id)
            if lease is not None:
                live = time.monotonic() < lease.live_until
                return replace(cached, url=lease.url, host_live=live), True
        location = await inventory.locate(self._db, ids.check_vm_id(vm_id))
        return owned(location, vm_id, customer_id), False

    def peek(self, customer_id: str, vm_id: str) -> VmLocation | None:
        """The caller's VM from the cache on a host that is live now, without any wait or query;
        None whenever `locate` would have more to do (a miss, another customer, a stale host view)."""
        cached = self._cache.get(vm_id)
        if cached is None or cached.customer_id != customer_id:
            return None
        lease = self._hosts.peek(cached.host_id)
        if lease is None or time.monotonic() >= lease.live_until:
            return None
        return replace(cached, url=lease.url, host_live=True)

    def confirmed(self, location: VmLocation, state: VmState | None = None) -> None:
        """The host answered for this VM: remember where it is (and the state it reported)."""
        self._cache.put(replace(location, reserved=False, state=state or location.state))

    def forget(self, vm_id: str) -> None:
        self._cache.drop(vm_id)
