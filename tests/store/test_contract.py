"""The store contract: the same cases against every store (SQLite on a temp file, memory)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from metald.domain.events import VmEvent, VmEventType
from metald.domain.model import CpuConfig, MemoryConfig, NicAddress, Vm, VmConfig
from metald.domain.states import VmState
from metald.ports import EventRetention, Store
from tests.store.conftest import OpenStore

T0 = datetime(2026, 12, 1, 12, 0, 0, 250_000, tzinfo=UTC)


def make_vm(vm_id: str, customer: str = "acme", vcpus: int = 1, mib: int = 128, **fields: object) -> Vm:
    config = VmConfig(cpu=CpuConfig(vcpus), memory=MemoryConfig(mib << 20), metadata={"k": vm_id})
    return dataclasses.replace(Vm(vm_id, customer, config, VmState.CREATED, T0, T0), **fields)  # type: ignore[arg-type]


def event(vm: Vm, kind: VmEventType = VmEventType.CREATED, at: datetime = T0) -> VmEvent:
    return VmEvent(vm.vm_id, vm.customer_id, kind, vm.state, VmState.UNSPECIFIED, "why", at)


async def insert(store: Store, vm: Vm) -> Vm:
    return await store.vms.insert(vm, event(vm))


async def test_insert_assigns_growing_seqs_and_get_returns_the_record(store: Store) -> None:
    nics = (NicAddress("eth0", "02:00:00:00:00:01", "10.0.0.2/24", "10.0.0.1"),)
    first = await insert(store, make_vm("vm_a", nics=nics, shutdown_reason="r", snapshot_id="snap_1"))
    second = await insert(store, make_vm("vm_b"))
    assert 0 < first.seq < second.seq
    got = await store.vms.get("vm_a")
    assert got == make_vm("vm_a", nics=nics, shutdown_reason="r", snapshot_id="snap_1", seq=first.seq)
    assert (await store.vms.get("vm_b")).snapshot_id == ""  # type: ignore[union-attr]
    assert await store.vms.get("vm_nope") is None


async def test_a_taken_id_is_key_error_and_writes_no_event(store: Store) -> None:
    await insert(store, make_vm("vm_a"))
    with pytest.raises(KeyError):
        await insert(store, make_vm("vm_a", customer="other"))
    assert (await store.vms.get("vm_a")).customer_id == "acme"  # type: ignore[union-attr]
    assert await store.events.events_after("other", 0, 10) == []
    assert await store.events.last_seq() == 1


async def test_the_stored_record_is_not_the_callers_object(store: Store) -> None:
    vm = await insert(store, make_vm("vm_a"))
    vm.state = VmState.RUNNING
    got = await store.vms.get("vm_a")
    assert got is not None and got.state is VmState.CREATED
    got.pending = "booting"
    assert (await store.vms.get("vm_a")).pending == ""  # type: ignore[union-attr]


async def test_save_persists_the_mutable_fields_only_and_its_event(store: Store) -> None:
    vm = await insert(store, make_vm("vm_a"))
    later = T0 + timedelta(seconds=5)
    changed = dataclasses.replace(
        vm,
        state=VmState.SHUTDOWN,
        nics=(NicAddress("eth0", "02:00:00:00:00:09"),),
        shutdown_reason="guest_poweroff",
        pending="stopping",
        updated_at=later,
        config=VmConfig(),  # a config never changes after create
    )
    await store.vms.save(changed, event(changed, VmEventType.EXITED, later))
    got = await store.vms.get("vm_a")
    assert got == dataclasses.replace(changed, config=vm.config)
    events = await store.events.events_after("acme", 0, 10)
    assert [(e.type, e.state, e.at) for e in events] == [
        (VmEventType.CREATED, VmState.CREATED, T0),
        (VmEventType.EXITED, VmState.SHUTDOWN, later),
    ]
    await store.vms.save(dataclasses.replace(got, pending=""))  # no event given: none written
    assert len(await store.events.events_after("acme", 0, 10)) == 2


async def test_changes_to_a_missing_vm_write_no_event(store: Store) -> None:
    ghost = make_vm("vm_ghost")
    await store.vms.save(ghost, event(ghost, VmEventType.STATE_CHANGED))
    await store.vms.delete("vm_ghost", event(ghost, VmEventType.DELETED))
    assert await store.vms.get("vm_ghost") is None
    assert await store.events.last_seq() == 0
    assert await store.events.first_seq() == 0


async def test_delete_removes_with_its_event_and_seqs_are_never_reused(store: Store) -> None:
    vm = await insert(store, make_vm("vm_a"))
    await store.vms.delete("vm_a", event(vm, VmEventType.DELETED))
    assert await store.vms.get("vm_a") is None
    again = await insert(store, make_vm("vm_a"))
    assert again.seq > vm.seq
    kinds = [e.type for e in await store.events.events_after("acme", 0, 10)]
    assert kinds == [VmEventType.CREATED, VmEventType.DELETED, VmEventType.CREATED]


async def test_list_page_is_keyset_ordered_per_customer_and_hides_creating(store: Store) -> None:
    for n in range(7):
        state = VmState.RUNNING if n % 2 else VmState.CREATED
        await insert(store, make_vm(f"vm_{n}", state=state))
        await insert(store, make_vm(f"other_{n}", customer="globex"))
    await insert(store, make_vm("vm_half", pending="creating"))
    page1 = await store.vms.list_page("acme", (), 0, 3)
    page2 = await store.vms.list_page("acme", (), page1[-1].seq, 3)
    page3 = await store.vms.list_page("acme", (), page2[-1].seq, 3)
    assert [v.vm_id for v in page1 + page2 + page3] == [f"vm_{n}" for n in range(7)]
    running = await store.vms.list_page("acme", (VmState.RUNNING,), 0, 10)
    assert [v.vm_id for v in running] == ["vm_1", "vm_3", "vm_5"]
    assert await store.vms.count("acme", ()) == 7
    assert await store.vms.count("acme", (VmState.RUNNING, VmState.PAUSED)) == 3
    assert await store.vms.count("nobody", ()) == 0
    assert [v.vm_id for v in await store.vms.all_vms()][-1] == "vm_half"  # all_vms sees everything


async def test_reads_after_each_write_see_it(store: Store) -> None:
    """The SQLite store keeps records and counts between writes: every write shows at once."""
    vm = await insert(store, make_vm("vm_a"))
    await insert(store, make_vm("vm_b", pending="creating"))
    assert await store.vms.count("acme", ()) == 1
    assert await store.vms.count("acme", (VmState.CREATED,)) == 1
    assert (await store.vms.get("vm_a")).state is VmState.CREATED  # type: ignore[union-attr]
    await store.vms.save(dataclasses.replace(vm, state=VmState.RUNNING, updated_at=T0 + timedelta(seconds=1)))
    assert (await store.vms.get("vm_a")).state is VmState.RUNNING  # type: ignore[union-attr]
    assert await store.vms.count("acme", (VmState.CREATED,)) == 0
    assert await store.vms.count("acme", (VmState.RUNNING,)) == 1
    created = await store.vms.get("vm_b")
    assert created is not None
    await store.vms.save(dataclasses.replace(created, pending=""))
    assert await store.vms.count("acme", ()) == 2
    await store.vms.delete("vm_a")
    assert await store.vms.get("vm_a") is None
    assert await store.vms.count("acme", ()) == 1
    assert await store.vms.count("acme", (VmState.RUNNING,)) == 0
    await insert(store, make_vm("vm_c", state=VmState.RUNNING))
    assert await store.vms.count("acme", (VmState.RUNNING,)) == 1


async def test_state_counts_and_usage(store: Store) -> None:
    await insert(store, make_vm("a1", vcpus=2, mib=256, state=VmState.RUNNING))
    await insert(store, make_vm("a2", vcpus=1, mib=128))
    await insert(store, make_vm("b1", customer="globex", vcpus=4, mib=512, state=VmState.RUNNING))
    assert await store.vms.state_counts() == {
        ("acme", VmState.RUNNING): 1,
        ("acme", VmState.CREATED): 1,
        ("globex", VmState.RUNNING): 1,
    }
    assert await store.vms.usage("acme") == (2, 3, 384 << 20)
    assert await store.vms.usage(None, (VmState.RUNNING,)) == (2, 6, 768 << 20)
    assert await store.vms.usage("nobody") == (0, 0, 0)


async def test_addresses_are_unique_per_pool_and_released_by_owner(store: Store) -> None:
    book = store.addresses
    assert await book.claim_address("ipv4@acme", "10.0.0.2", "vm_a")
    assert not await book.claim_address("ipv4@acme", "10.0.0.2", "vm_b")
    assert await book.claim_address("ipv4@globex", "10.0.0.2", "vm_b")
    assert await book.claim_address("mac@acme", "02:00:00:00:00:01", "vm_a")
    assert await book.used_addresses("ipv4@acme") == {"10.0.0.2"}
    await book.release_addresses("vm_a")
    assert await book.used_addresses("ipv4@acme") == set()
    assert await book.used_addresses("mac@acme") == set()
    assert await book.used_addresses("ipv4@globex") == {"10.0.0.2"}
    assert await book.claim_address("ipv4@acme", "10.0.0.2", "vm_c")


async def test_a_secret_is_made_once(store: Store) -> None:
    assert await store.secrets.secret("page_token_key", b"first") == b"first"
    assert await store.secrets.secret("page_token_key", b"second") == b"first"
    assert await store.secrets.secret("other", b"x") == b"x"


async def test_events_after_is_per_customer_ascending_and_limited(store: Store) -> None:
    for n in range(5):
        await insert(store, make_vm(f"a{n}"))
        await insert(store, make_vm(f"g{n}", customer="globex"))
    acme = await store.events.events_after("acme", 0, 10)
    assert [e.vm_id for e in acme] == [f"a{n}" for n in range(5)]
    assert [e.seq for e in acme] == [1, 3, 5, 7, 9]
    assert all(e.customer_id == "acme" and e.reason == "why" for e in acme)
    assert [e.seq for e in await store.events.events_after("acme", 3, 2)] == [5, 7]
    assert (await store.events.first_seq(), await store.events.last_seq()) == (1, 10)


async def test_retention_by_count_keeps_the_newest_events(open_store: OpenStore) -> None:
    store = await open_store(EventRetention(count=10))
    try:
        for n in range(300):  # pruned on write as it goes
            await insert(store, make_vm(f"vm_{n}"))
        assert await store.events.last_seq() == 300
        assert await store.events.first_seq() > 1
        await store.events.prune()
        assert (await store.events.first_seq(), await store.events.last_seq()) == (291, 300)
        assert [e.seq for e in await store.events.events_after("acme", 0, 100)] == list(range(291, 301))
    finally:
        await store.close()


async def test_retention_by_age_keeps_the_newest_event(open_store: OpenStore) -> None:
    store = await open_store(EventRetention(count=1000, max_age_seconds=3600))
    try:
        old = datetime.now(UTC) - timedelta(hours=2)
        for n in range(3):
            vm = make_vm(f"vm_{n}")
            await store.vms.insert(vm, event(vm, at=old))
        assert await store.events.prune() == 2  # all too old, but the newest stays
        assert (await store.events.first_seq(), await store.events.last_seq()) == (3, 3)
        vm = make_vm("vm_new")
        await store.vms.insert(vm, event(vm, at=datetime.now(UTC)))
        assert await store.events.prune() == 1
        assert [e.vm_id for e in await store.events.events_after("acme", 0, 10)] == ["vm_new"]
        assert await store.events.prune() == 0
    finally:
        await store.close()


async def test_ping_is_healthy(store: Store) -> None:
    assert (await store.ping()).status == "healthy"
