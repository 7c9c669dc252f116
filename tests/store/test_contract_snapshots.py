"""The snapshot records contract, against every store."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from metald.domain.events import VmEvent, VmEventType
from metald.domain.model import CpuConfig, MemoryConfig, Vm, VmConfig
from metald.domain.snapshots import PENDING_CREATING, Snapshot, check_snapshot_id, new_snapshot_id
from metald.domain.states import VmState
from metald.ports import Store

T0 = datetime(2026, 12, 1, 12, 0, 0, 500_000, tzinfo=UTC)
CONFIG = VmConfig(cpu=CpuConfig(2), memory=MemoryConfig(256 << 20), metadata={"from": "source"})


def snap(snapshot_id: str, customer: str = "acme", size: int = 1000, **fields: object) -> Snapshot:
    base = Snapshot(snapshot_id, customer, "vm_src", CONFIG, T0, size, {"tag": snapshot_id}, 2)
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


async def clone(store: Store, vm_id: str, snapshot_id: str) -> None:
    vm = Vm(vm_id, "acme", CONFIG, VmState.CREATED, T0, T0, snapshot_id=snapshot_id)
    await store.vms.insert(vm, VmEvent(vm_id, "acme", VmEventType.CREATED, vm.state, vm.state, "", T0))


async def test_insert_get_and_a_taken_id(store: Store) -> None:
    first = await store.snapshots.insert(snap("snap_a"))
    second = await store.snapshots.insert(snap("snap_b"))
    assert 0 < first.seq < second.seq
    assert await store.snapshots.get("snap_a") == snap("snap_a", seq=first.seq)
    assert await store.snapshots.get("snap_nope") is None
    with pytest.raises(KeyError):
        await store.snapshots.insert(snap("snap_a", customer="other"))
    assert (await store.snapshots.get("snap_a")).customer_id == "acme"  # type: ignore[union-attr]


async def test_save_persists_size_pending_and_pool(store: Store) -> None:
    pending = await store.snapshots.insert(snap("snap_a", size=0, pending=PENDING_CREATING))
    assert (await store.snapshots.get("snap_a")).pending == PENDING_CREATING  # type: ignore[union-attr]
    await store.snapshots.save(dataclasses.replace(pending, size_bytes=4096, pending="", warm_pool_size=3))
    got = await store.snapshots.get("snap_a")
    assert got is not None and (got.size_bytes, got.pending, got.warm_pool_size) == (4096, "", 3)
    assert got.config == CONFIG and got.metadata == {"tag": "snap_a"}


async def test_list_page_is_keyset_ordered_per_customer_hiding_pending_and_deleted(store: Store) -> None:
    for n in range(5):
        await store.snapshots.insert(snap(f"snap_{n}"))
        await store.snapshots.insert(snap(f"other_{n}", customer="globex"))
    await store.snapshots.insert(snap("snap_half", pending=PENDING_CREATING))
    await store.snapshots.mark_deleted("snap_2")
    page1 = await store.snapshots.list_page("acme", 0, 2)
    page2 = await store.snapshots.list_page("acme", page1[-1].seq, 2)
    page3 = await store.snapshots.list_page("acme", page2[-1].seq, 2)
    assert [s.snapshot_id for s in page1 + page2 + page3] == ["snap_0", "snap_1", "snap_3", "snap_4"]
    assert await store.snapshots.count("acme") == 4
    assert await store.snapshots.count("nobody") == 0


async def test_a_deleted_snapshot_disappears_at_once_but_is_kept_for_its_clones(store: Store) -> None:
    await store.snapshots.insert(snap("snap_a"))
    await clone(store, "vm_c1", "snap_a")
    await clone(store, "vm_c2", "snap_a")
    await store.snapshots.mark_deleted("snap_a")
    assert await store.snapshots.get("snap_a") is None
    assert await store.snapshots.list_page("acme", 0, 10) == []
    assert await store.snapshots.clone_count("snap_a") == 2
    assert await store.snapshots.unused_deleted() == []
    with pytest.raises(KeyError):  # the id stays taken while the record is kept
        await store.snapshots.insert(snap("snap_a"))
    await store.vms.delete("vm_c1")
    assert await store.snapshots.unused_deleted() == []
    await store.vms.delete("vm_c2")
    assert [s.snapshot_id for s in await store.snapshots.unused_deleted()] == ["snap_a"]
    assert (await store.snapshots.unused_deleted())[0].deleted
    await store.snapshots.purge("snap_a")
    await store.snapshots.purge("snap_a")  # idempotent
    assert await store.snapshots.all_snapshots() == []
    await store.snapshots.insert(snap("snap_a"))  # purged: the id is free again


async def test_usage_counts_what_is_not_deleted_pending_included(store: Store) -> None:
    await store.snapshots.insert(snap("snap_a", size=100))
    await store.snapshots.insert(snap("snap_b", size=200, pending=PENDING_CREATING))
    await store.snapshots.insert(snap("snap_c", size=400))
    await store.snapshots.insert(snap("snap_g", customer="globex", size=800))
    await store.snapshots.mark_deleted("snap_c")
    assert await store.snapshots.usage("acme") == (2, 300)
    assert await store.snapshots.usage("nobody") == (0, 0)


async def test_all_snapshots_lists_every_record_for_recovery(store: Store) -> None:
    await store.snapshots.insert(snap("snap_a", pending=PENDING_CREATING))
    await store.snapshots.insert(snap("snap_b"))
    await store.snapshots.mark_deleted("snap_b")
    found = await store.snapshots.all_snapshots()
    assert [(s.snapshot_id, s.pending, s.deleted) for s in found] == [
        ("snap_a", PENDING_CREATING, False),
        ("snap_b", "", True),
    ]


def test_snapshot_ids() -> None:
    first, second = new_snapshot_id(1_000), new_snapshot_id(2_000)
    assert first.startswith("snap_") and len(first) == 31 and first < second
    assert check_snapshot_id(first) == first
