"""The read paths' shortcuts: configs and creation times converted once per stored object, listing
counts from an index."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from metald.api.convert import config_to_proto, created_timestamp, timestamp
from metald.domain import model
from metald.domain.events import VmEvent, VmEventType
from metald.domain.pending import PendingOp
from metald.domain.states import VmState
from metald.store.sqlite import SqliteStore
from metald.store.sqlite_vms import _filter


def test_a_config_is_converted_once_and_equal_configs_each_get_their_own_message() -> None:
    config = model.VmConfig(memory=model.MemoryConfig(1 << 28), metadata={"k": "v"})
    twin = model.VmConfig(memory=model.MemoryConfig(1 << 28), metadata={"k": "v"})
    first = config_to_proto(config)
    assert config_to_proto(config) is first
    assert config_to_proto(twin) is not first and config_to_proto(twin) == first
    assert first.memory.size_bytes == 1 << 28 and dict(first.metadata) == {"k": "v"}


def test_a_creation_time_is_converted_once_and_an_equal_time_gets_its_own_message() -> None:
    created = datetime(2026, 12, 2, 14, 0, 0, 123456, tzinfo=UTC)
    twin = created.replace()
    first = created_timestamp(created)
    assert created_timestamp(created) is first and first == timestamp(created)
    assert (first.seconds, first.nanos) == (int(created.timestamp()), 123456000)
    assert created_timestamp(twin) is not first and created_timestamp(twin) == first


async def test_each_read_of_a_row_shares_its_config_and_creation_time(tmp_path: Path) -> None:
    """What the conversion memos above need from the store: one object per stored row."""
    store = await SqliteStore.open(tmp_path / "metald.db")
    try:
        await store.vms.insert(*_created(_vm("vm_a", VmState.CREATED)))
        listed = (await store.vms.list_page("c1", [], 0, 10))[0]
        listed.state = VmState.RUNNING
        await store.vms.save(listed)  # a write: the next read builds the record from its row again
        again = await store.vms.get("vm_a")
        assert again is not None and again is not listed and again.state is VmState.RUNNING
        assert again.config is listed.config and again.created_at is listed.created_at
    finally:
        await store.close()


def _vm(vm_id: str, state: VmState, pending: str = "") -> model.Vm:
    now = datetime.now(UTC)
    return model.Vm(
        vm_id=vm_id,
        customer_id="c1",
        config=model.VmConfig(),
        state=state,
        created_at=now,
        updated_at=now,
        pending=PendingOp.of(pending),
    )


def _created(vm: model.Vm) -> tuple[model.Vm, VmEvent]:
    return vm, VmEvent(
        vm.vm_id, vm.customer_id, VmEventType.CREATED, vm.state, VmState.UNSPECIFIED, "", vm.created_at
    )


async def test_a_filtered_listing_and_its_count_read_only_the_listing_index(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "metald.db")
    try:
        for i in range(6):
            await store.vms.insert(*_created(_vm(f"vm_{i}", VmState.SHUTDOWN if i % 2 else VmState.CREATED)))
        await store.vms.insert(*_created(_vm("vm_half", VmState.SHUTDOWN, pending="creating")))
        assert await store.vms.count("c1", [VmState.SHUTDOWN]) == 3
        assert [vm.vm_id for vm in await store.vms.list_page("c1", [VmState.SHUTDOWN], 0, 10)] == [
            "vm_1",
            "vm_3",
            "vm_5",
        ]
    finally:
        await store.close()
    where, params = _filter("c1", [VmState.SHUTDOWN])
    with sqlite3.connect(tmp_path / "metald.db") as db:
        plan = db.execute(f"EXPLAIN QUERY PLAN SELECT COUNT(*) FROM vms WHERE {where}", params).fetchall()
    assert any("vms_listed" in str(step) for step in plan), plan
