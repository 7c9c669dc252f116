"""The gateway's routing cache (metald/fleet/routes.py) against a throwaway PostgreSQL, in process:
a cached location serves only the customer the host confirmed it for, a host's lapsed lease is
seen between reads of the host table, a dropped location is read again, the LRU stays bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from metald.domain.errors import ErrorCode, MetaldError, not_found, not_owned, refusal
from metald.domain.model import BootConfig, CpuConfig, MemoryConfig, Vm, VmConfig
from metald.domain.states import VmState
from metald.fleet import inventory
from metald.fleet.db import FleetDb
from metald.fleet.inventory import HostCapacity, VmLocation
from metald.fleet.routes import HostView, LocationCache, Routes, is_stale
from tests.fleet.postgres import Postgres

CONFIG = VmConfig(CpuConfig(1), MemoryConfig(256 << 20), BootConfig("/assets/vmlinux"))
CAPACITY = HostCapacity(8, 8 << 30, 100)


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    pg = Postgres(port=5497)
    try:
        yield pg.start().dsn
    finally:
        pg.destroy()


def _vm(vm_id: str, customer: str) -> Vm:
    now = datetime.now(UTC)
    return Vm(vm_id, customer, CONFIG, VmState.CREATED, now, now)


def test_a_cached_location_serves_only_its_customer_and_a_dropped_one_is_read_again(dsn: str) -> None:
    async def scenario() -> None:
        db = FleetDb(dsn)
        await db.open()
        try:
            await inventory.heartbeat(db, "rt-a", "http://rt-a:8080", CAPACITY, 30)
            await inventory.upsert_vms(db, "rt-a", [_vm("vm_rt1", "acme")])
            routes = Routes(db)
            location, cached = await routes.locate("acme", "vm_rt1")
            assert (location.host_id, location.host_live, cached) == ("rt-a", True, False)
            routes.confirmed(location, VmState.RUNNING)
            again, cached = await routes.locate("acme", "vm_rt1")
            assert cached and again.state == VmState.RUNNING and again.url == "http://rt-a:8080"
            # Another customer never gets the cached location: the database answers, as without a cache.
            with pytest.raises(MetaldError) as refused:
                await routes.locate("mallory", "vm_rt1")
            assert refused.value.reason == "VM_NOT_OWNED"
            # The id deleted and reused by another customer elsewhere: once dropped, read again.
            await inventory.forget(db, "vm_rt1", "rt-a")
            await inventory.heartbeat(db, "rt-b", "http://rt-b:8080", CAPACITY, 30)
            await inventory.upsert_vms(db, "rt-b", [_vm("vm_rt1", "mallory")])
            reused, cached = await routes.locate("mallory", "vm_rt1")
            assert (reused.host_id, cached) == ("rt-b", False)
            routes.forget("vm_rt1")
            with pytest.raises(MetaldError) as gone:
                await routes.locate("acme", "vm_rt1")
            assert gone.value.reason == "VM_NOT_OWNED"
            fresh, cached = await routes.locate("mallory", "vm_rt1", fresh=True)
            assert (fresh.host_id, cached) == ("rt-b", False)
        finally:
            await db.close()

    asyncio.run(scenario())


def test_a_lapsed_lease_is_seen_between_reads_of_the_host_table(dsn: str) -> None:
    async def scenario() -> None:
        db = FleetDb(dsn)
        await db.open()
        try:
            await inventory.heartbeat(db, "rt-lease", "http://rt-lease:8080", CAPACITY, 1.5)
            await inventory.upsert_vms(db, "rt-lease", [_vm("vm_rtlease", "acme")])
            view = HostView(db, max_age=3600)  # never read again: only the lease end it read counts
            routes = Routes(db, view)
            location, _ = await routes.locate("acme", "vm_rtlease")
            routes.confirmed(location)
            live, cached = await routes.locate("acme", "vm_rtlease")
            assert cached and live.host_live
            await asyncio.sleep(1.7)
            lapsed, cached = await routes.locate("acme", "vm_rtlease")
            assert cached and not lapsed.host_live
            # A renewed lease is seen at the next read (HOST_VIEW_SECONDS in the gateway).
            await inventory.heartbeat(db, "rt-lease", "http://rt-lease:8080", CAPACITY, 30)
            renewed = Routes(db, HostView(db, max_age=0.0), LocationCache())
            location, _ = await renewed.locate("acme", "vm_rtlease")
            renewed.confirmed(location)
            back, cached = await renewed.locate("acme", "vm_rtlease")
            assert cached and back.host_live
        finally:
            await db.close()

    asyncio.run(scenario())


def test_the_location_cache_is_a_bounded_lru() -> None:
    cache = LocationCache(max_size=2)
    for vm_id in ("vm_a", "vm_b"):
        cache.put(VmLocation(vm_id, "acme", "h1", "", True, False))
    assert cache.get("vm_a") is not None  # now the most recent
    cache.put(VmLocation("vm_c", "acme", "h1", "", True, False))
    assert len(cache) == 2 and cache.get("vm_b") is None and cache.get("vm_a") is not None
    cache.drop("vm_a")
    assert cache.get("vm_a") is None


def test_only_the_hosts_word_that_it_lacks_the_vm_drops_a_cached_location() -> None:
    assert is_stale(not_found("vm_a")) and is_stale(not_owned("vm_a", "acme"))
    assert not is_stale(refusal(ErrorCode.NOT_FOUND, "FILE_NOT_FOUND", "no such file"))
