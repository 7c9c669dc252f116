"""Warm pools in process (metald/service/pool.py) with the fake backend's slots: filling to
warm_pool_size, a clone taking a slot and the refill, misses, the host memory bound, failures,
deletion, and a restart after a kill -9 that left slots behind."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.model import ConsoleConfig, MemoryConfig, VmConfig
from metald.domain.quotas import Quotas
from metald.service import VmService
from metald.testing import FakeBackend
from tests.service.conftest import CUSTOMER, NIC, World, open_world

MIB = 1024 * 1024


async def _pooled_world(tmp: Path, quotas: Quotas | None = None) -> World:
    world = await open_world(tmp, quotas)
    world.backend = FakeBackend(warm_pool=True)
    world.make_service = _with_pool_dir(world)  # type: ignore[method-assign]
    world.service = world.make_service()
    await world.service.recover()
    return world


def _with_pool_dir(world: World):  # type: ignore[no-untyped-def]
    plain = World.make_service

    def make() -> VmService:
        service = plain(world)
        service._opts = dataclasses.replace(service._opts, pool_dir=world.tmp / "pool")
        return service

    return make


@pytest.fixture(autouse=True)
def _no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("metald.service.pool.RETRY_SECONDS", 0.0)
    monkeypatch.setattr("metald.service.pool.REFILL_DELAY_SECONDS", 0.0)


@pytest.fixture
async def pooled(tmp_path: Path) -> AsyncIterator[World]:
    w = await _pooled_world(tmp_path)
    yield w
    await _stop_fills(w)
    await w.close()


async def _stop_fills(world: World) -> None:
    for pool in world.service._pools.values():
        if pool.task is not None:
            await pool.task


async def _filled(world: World) -> None:
    """Wait for every pool's fill task to end."""
    await _stop_fills(world)


async def _template(world: World, pool_size: int, config: VmConfig | None = None) -> str:
    await world.create("vm-src", config or VmConfig())
    await world.boot("vm-src")
    taken = await world.service.snapshot(CUSTOMER, "vm-src", "snap-1", {}, pool_size)
    await _filled(world)
    return taken.snapshot.snapshot_id


def _slots(world: World) -> list[Path]:
    return sorted(world.backend.pool_slots)


async def test_a_pool_fills_a_clone_takes_a_slot_and_it_refills(pooled: World) -> None:
    await _template(pooled, 2)
    first = _slots(pooled)
    assert len(first) == 2 and all(p.parent == pooled.tmp / "pool" / "snap-1" for p in first)
    status = pooled.service.warm_pool_status()
    assert (status.pools, status.target, status.ready, status.hits) == (1, 2, 2, 0)
    await pooled.service.create(CUSTOMER, "clone-1", VmConfig(), "", snapshot_id="snap-1")
    await pooled.boot("clone-1")
    vmm = pooled.backend.vmms["clone-1"]
    taken = next(p for p in first if p.name == vmm.pool_slot)
    assert vmm.spec.restore_from == pooled.tmp / "snapshots" / "snap-1"
    assert not taken.exists() and (pooled.tmp / "vms" / "clone-1").is_dir()
    await _filled(pooled)
    assert len(_slots(pooled)) == 2 and taken not in _slots(pooled)
    status = pooled.service.warm_pool_status()
    assert (status.ready, status.hits, status.misses) == (2, 1, 0)


async def test_a_clone_that_cannot_run_in_a_slot_is_a_miss_and_restores_normally(pooled: World) -> None:
    await _template(pooled, 1)
    console = VmConfig(console=ConsoleConfig(output_file="mine.log"))
    await pooled.service.create(CUSTOMER, "clone-c", console, "", snapshot_id="snap-1")
    await pooled.boot("clone-c")
    assert pooled.backend.vmms["clone-c"].pool_slot == "" and len(_slots(pooled)) == 1
    assert pooled.service.warm_pool_status().misses == 1


async def test_an_empty_pool_is_a_miss(pooled: World) -> None:
    await _template(pooled, 1)
    for slot in _slots(pooled):  # the slot's VMM died on its own
        pooled.backend.pool_slots.pop(slot)
    pooled.backend.faults.fail("start_pool_slot", RuntimeError("no"), times=0)
    await pooled.service.create(CUSTOMER, "clone-1", VmConfig(), "", snapshot_id="snap-1")
    await pooled.boot("clone-1")
    assert pooled.backend.vmms["clone-1"].pool_slot == ""
    assert pooled.service.warm_pool_status().misses == 1


async def test_a_snapshot_with_nics_gets_slots_with_held_taps_that_a_clone_takes(pooled: World) -> None:
    await _template(pooled, 2, NIC)
    slots = _slots(pooled)
    assert len(slots) == 2 and sorted(pooled.network.held) == sorted(p.name for p in slots)
    spec = pooled.backend.pool_slots[slots[0]]
    assert spec.netns == f"ns_held_{slots[0].name}" and [n.tap_device for n in spec.nics] == ["held0"]
    check = await pooled.service.warm_pool_check()
    assert check.status == "healthy" and "2/2 slots ready" in check.detail
    await pooled.service.create(CUSTOMER, "clone-n", NIC, "", snapshot_id="snap-1")
    await pooled.boot("clone-n")
    vmm = pooled.backend.vmms["clone-n"]
    assert vmm.pool_slot in {p.name for p in slots} and vmm.pool_slot not in pooled.network.held
    assert vmm.spec.netns == "ns_clone-n" and len(vmm.spec.nics) == 1  # its own attachment
    assert pooled.service.warm_pool_status().hits == 1
    await _filled(pooled)
    assert len(pooled.network.held) == 2 and vmm.pool_slot not in pooled.network.held


async def test_held_taps_that_cannot_be_moved_are_a_miss_and_the_slot_goes(pooled: World) -> None:
    await _template(pooled, 1, NIC)
    [slot] = _slots(pooled)
    pooled.network.held.pop(slot.name)  # its holder namespace vanished
    pooled.backend.faults.fail("start_pool_slot", RuntimeError("no"), times=0)
    await pooled.service.create(CUSTOMER, "clone-n", NIC, "", snapshot_id="snap-1")
    await pooled.boot("clone-n")
    assert pooled.backend.vmms["clone-n"].pool_slot == "" and _slots(pooled) == []
    assert pooled.service.warm_pool_status().misses == 1


async def test_a_boot_failing_after_taking_a_slot_stops_it_and_its_holder(pooled: World) -> None:
    await _template(pooled, 1, NIC)
    [slot] = _slots(pooled)
    pooled.backend.faults.fail("start_pool_slot", RuntimeError("no"), times=0)
    pooled.network.faults.fail("attach", RuntimeError("bridge broke"), times=1)
    await pooled.service.create(CUSTOMER, "clone-n", NIC, "", snapshot_id="snap-1")
    with pytest.raises(MetaldError):
        await pooled.boot("clone-n")
    await _filled(pooled)  # the refills fail too, each unholding what it held
    assert slot not in _slots(pooled) and pooled.network.held == {}


async def test_nic_slots_leave_no_holder_after_delete_or_restart(pooled: World) -> None:
    await _template(pooled, 2, NIC)
    await pooled.restart()  # kill -9: the old slots and their holders were left
    await _filled(pooled)
    assert sorted(pooled.network.held) == sorted(p.name for p in _slots(pooled))
    await pooled.service.delete_snapshot(CUSTOMER, "snap-1")
    assert _slots(pooled) == [] and pooled.network.held == {}


async def test_shutdown_stops_every_slot_and_holder(pooled: World) -> None:
    await _template(pooled, 2, NIC)
    await pooled.service.close_pools()
    assert _slots(pooled) == [] and pooled.network.held == {}
    assert pooled.service.warm_pool_status().pools == 0


async def test_slots_are_bounded_by_host_memory(tmp_path: Path) -> None:
    # 128 MiB guests: the source (running) and one slot fit in 300 MiB, a second slot does not.
    world = await _pooled_world(tmp_path, Quotas(max_host_memory_bytes=300 * MIB))
    try:
        await _template(world, 2, VmConfig(memory=MemoryConfig(size_bytes=128 * MIB)))
        assert len(_slots(world)) == 1
        assert "host memory" in world.service.warm_pool_status().blocked[0]
    finally:
        await world.close()


async def test_a_failing_slot_is_retried_then_reported(pooled: World) -> None:
    pooled.backend.faults.fail("start_pool_slot", RuntimeError("qemu says no"), times=0)
    await _template(pooled, 1)
    assert pooled.backend.faults.calls["start_pool_slot"] == 3 and _slots(pooled) == []
    assert not (pooled.tmp / "pool" / "snap-1").exists() or not any(
        (pooled.tmp / "pool" / "snap-1").iterdir()
    )
    check = await pooled.service.warm_pool_check()
    assert check.status == "degraded" and "qemu says no" in check.detail
    # The next clone's boot finds the pool empty (a miss) and makes it try again.
    pooled.backend.faults.clear("start_pool_slot")
    await pooled.service.create(CUSTOMER, "clone-1", VmConfig(), "", snapshot_id="snap-1")
    await pooled.boot("clone-1")
    await _filled(pooled)
    assert len(_slots(pooled)) == 1 and (await pooled.service.warm_pool_check()).status == "healthy"


async def test_deleting_the_snapshot_stops_its_slots(pooled: World) -> None:
    await _template(pooled, 2)
    await pooled.service.delete_snapshot(CUSTOMER, "snap-1")
    assert _slots(pooled) == [] and not (pooled.tmp / "pool" / "snap-1").exists()
    assert pooled.service.warm_pool_status().pools == 0


async def test_deleting_while_a_slot_starts_leaves_none(pooled: World) -> None:
    gate = pooled.backend.faults.hold("start_pool_slot")
    await pooled.create("vm-src")
    await pooled.boot("vm-src")
    await pooled.service.snapshot(CUSTOMER, "vm-src", "snap-1", {}, 2)
    await pooled.backend.faults.entered["start_pool_slot"].wait()
    deleting = asyncio.create_task(pooled.service.delete_snapshot(CUSTOMER, "snap-1"))
    await asyncio.sleep(0.01)
    gate.set()
    await deleting
    assert _slots(pooled) == [] and not (pooled.tmp / "pool" / "snap-1").exists()


async def test_a_restart_after_kill_9_removes_left_slots_and_refills(pooled: World) -> None:
    await _template(pooled, 2)
    left = _slots(pooled)
    await pooled.restart()  # the same fake backend: the old slots "kept running"
    await _filled(pooled)
    now = _slots(pooled)
    assert len(now) == 2 and not set(now) & set(left) and all(not p.exists() for p in left)
    assert sorted((pooled.tmp / "pool" / "snap-1").iterdir()) == now


async def test_warm_pool_size_is_bounded(pooled: World) -> None:
    await pooled.create("vm-src")
    await pooled.boot("vm-src")
    with pytest.raises(MetaldError) as e:
        await pooled.service.snapshot(CUSTOMER, "vm-src", "snap-big", {}, 3)
    assert e.value.code is ErrorCode.INVALID_ARGUMENT and e.value.metadata.get("field") == "warm_pool_size"
