"""The fleet inventory against a throwaway PostgreSQL, in process: hosts report their snapshots
(and drop deleted ones), clones are reserved only on their snapshot's host (full: a reason; down:
HOST_UNAVAILABLE), the operators' host report, and the gateway's composite watch cursor."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from metald.domain.errors import MetaldError
from metald.domain.events import VmEvent, VmEventType
from metald.domain.model import BootConfig, CpuConfig, MemoryConfig, Vm, VmConfig
from metald.domain.paging import PageTokens
from metald.domain.quotas import Quotas
from metald.domain.snapshots import Snapshot
from metald.domain.states import VmState
from metald.fleet import inventory, snapshot_rows
from metald.fleet.agent import HostAgent, HostIdentity
from metald.fleet.db import FleetDb
from metald.fleet.gateway_snapshots import FleetSnapshots, SnapshotQuota
from metald.fleet.gateway_watch import FleetCursor
from metald.fleet.inventory import HostCapacity, VmLocation
from metald.fleet.operator import hosts_report
from metald.fleet.placement import reserve
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.store.memory import MemoryStore
from tests.fleet.postgres import Postgres

GIB = 1 << 30
CONFIG = VmConfig(CpuConfig(1), MemoryConfig(256 << 20), BootConfig("/assets/vmlinux"))


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    pg = Postgres(port=5499)
    try:
        yield pg.start().dsn
    finally:
        pg.destroy()


def _vm(vm_id: str, customer: str, config: VmConfig = CONFIG) -> Vm:
    now = datetime.now(UTC)
    return Vm(vm_id, customer, config, VmState.RUNNING, now, now)


async def _host(
    db: FleetDb, name: str, vcpus: int = 8, memory: int = 8 * GIB
) -> tuple[HostAgent, MemoryStore]:
    store = MemoryStore()
    agent = HostAgent(
        db, store.vms, HostIdentity(name, f"http://{name}:8080", vcpus, memory, 0),
        heartbeat=1, lease=30, snapshots=store.snapshots, events=store.events,
    )  # fmt: skip
    await agent.sync_once()
    return agent, store


def test_hosts_report_their_snapshots_and_clones_go_to_the_snapshots_host(dsn: str) -> None:
    async def scenario() -> None:
        db = FleetDb(dsn)
        await db.open()
        try:
            agent, store = await _host(db, "inv-a")
            await _host(db, "inv-b", vcpus=64, memory=64 * GIB)  # far emptier: plain creates go there
            vm = _vm("vm_src1", "acme")
            event = VmEvent(
                vm.vm_id, "acme", VmEventType.CREATED, vm.state, VmState.UNSPECIFIED, "", vm.created_at
            )
            await store.vms.insert(vm, event)
            snap = Snapshot("snap_inv1", "acme", vm.vm_id, CONFIG, datetime.now(UTC), size_bytes=4096)
            await store.snapshots.insert(snap)
            await agent.sync_once()
            location = await snapshot_rows.owned_snapshot(db, "acme", "snap_inv1")
            assert (location.host_id, location.config.vcpu_count) == ("inv-a", 1)
            with pytest.raises(MetaldError) as refused:
                await snapshot_rows.owned_snapshot(db, "mallory", "snap_inv1")
            assert refused.value.reason == "SNAPSHOT_NOT_OWNED"
            page, total = await snapshot_rows.list_snapshot_page(db, "acme", 0, 10)
            assert (
                [s.snapshot_id for s in page] == ["snap_inv1"] and total == 1 and page[0].size_bytes == 4096
            )
            assert [h.last_event_seq for h in await inventory.hosts(db) if h.host_id == "inv-a"] == [1]

            clone = _vm("vm_clone1", "acme")
            placed = await reserve(db, clone, Quotas(), on_host="inv-a")
            assert placed.host_id == "inv-a"
            assert (await reserve(db, _vm("vm_plain1", "acme"), Quotas())).host_id == "inv-b"
            big = VmConfig(CpuConfig(16), MemoryConfig(GIB), BootConfig("/assets/vmlinux"))
            with pytest.raises(MetaldError) as full:
                await reserve(db, _vm("vm_clone2", "acme", big), Quotas(), on_host="inv-a")
            assert (full.value.code.value, full.value.reason) == ("resource_exhausted", "SNAPSHOT_HOST_FULL")
            assert full.value.metadata["host_id"] == "inv-a"

            report = {h["host_id"]: h for h in (await hosts_report(db))["hosts"]}
            assert report["inv-a"]["snapshot_count"] == 1 and report["inv-a"]["vms_active"] == 1
            assert report["inv-a"]["live"] and report["inv-a"]["vcpus_total"] == 8

            await inventory.heartbeat(db, "inv-a", "http://inv-a:8080", HostCapacity(8, 8 * GIB, 0), -1)
            with pytest.raises(MetaldError) as down:
                await reserve(db, _vm("vm_clone3", "acme"), Quotas(), on_host="inv-a")
            assert (down.value.reason, down.value.metadata["host_id"]) == ("HOST_UNAVAILABLE", "inv-a")

            await store.snapshots.mark_deleted("snap_inv1")  # deleted on the host: gone from the fleet
            await agent.sync_once()
            assert await snapshot_rows.locate_snapshot(db, "snap_inv1") is None
        finally:
            await db.close()

    asyncio.run(scenario())


class _Host:
    """HostClients for FleetSnapshots: every SnapshotVm succeeds with a snapshot of 3 GiB."""

    def __init__(self) -> None:
        self.taken = 0

    def rpc(self, url: str) -> Any:
        return SimpleNamespace(snapshot_vm="snapshot_vm")

    async def call(self, host_id: str, customer_id: str, method: Any, request: Any, **kw: Any) -> Any:
        self.taken += 1
        return pb.SnapshotVmResponse(
            snapshot_id=request.snapshot_id, size_bytes=3 * GIB, state=pb.VmState.RUNNING
        )


def test_snapshot_quotas_hold_across_hosts(dsn: str) -> None:
    """Count and bytes of a customer's snapshots on every host, checked by the gateway before the
    host is asked; another customer is not counted."""

    async def scenario() -> None:
        db = FleetDb(dsn)
        await db.open()
        try:
            agent_a, store_a = await _host(db, "quota-a")
            agent_b, store_b = await _host(db, "quota-b")
            source = _vm("vm_qb", "quotaco")  # on quota-b: the gateway records its snapshots by it
            created = VmEvent(
                source.vm_id,
                "quotaco",
                VmEventType.CREATED,
                source.state,
                VmState.UNSPECIFIED,
                "",
                source.created_at,
            )
            await store_b.vms.insert(source, created)
            await agent_b.sync_once()
            now = datetime.now(UTC)
            await store_a.snapshots.insert(
                Snapshot("snap_qa1", "quotaco", "vm_qa", CONFIG, now, size_bytes=GIB)
            )
            await store_a.snapshots.insert(
                Snapshot("snap_qx1", "other", "vm_qx", CONFIG, now, size_bytes=9 * GIB)
            )
            await agent_a.sync_once()
            assert await snapshot_rows.customer_snapshot_usage(db, "quotaco") == (1, GIB)
            host = _Host()
            on_b = VmLocation("vm_qb", "quotaco", "quota-b", "http://quota-b:8080", True, False)

            by_count = FleetSnapshots(db, host, PageTokens(b"k" * 32), SnapshotQuota(count=2))  # type: ignore[arg-type]
            await by_count.take(on_b, "snap_qb1", {}, 0)  # 2nd of 2: on another host than the 1st
            with pytest.raises(MetaldError) as full:
                await by_count.take(on_b, "snap_qb2", {}, 0)
            assert (full.value.code.value, full.value.reason) == (
                "resource_exhausted",
                "SNAPSHOT_QUOTA_EXCEEDED",
            )
            assert full.value.metadata == {"customer_id": "quotaco"} and host.taken == 1

            by_bytes = FleetSnapshots(db, host, PageTokens(b"k" * 32), SnapshotQuota(bytes=4 * GIB))  # type: ignore[arg-type]
            with pytest.raises(MetaldError) as too_big:  # 1 GiB + 3 GiB held
                await by_bytes.take(on_b, "snap_qb3", {}, 0)
            assert too_big.value.reason == "SNAPSHOT_QUOTA_EXCEEDED" and host.taken == 1
            roomy = FleetSnapshots(db, host, PageTokens(b"k" * 32), SnapshotQuota(count=3, bytes=5 * GIB))  # type: ignore[arg-type]
            await roomy.take(on_b, "snap_qb4", {}, 0)
            assert host.taken == 2
        finally:
            await db.close()

    asyncio.run(scenario())


def test_the_composite_watch_cursor_round_trips_and_refuses_anything_else() -> None:
    cursor = FleetCursor(1_800_000_000.5, {"host1": "42", "host2": "~7"})
    assert FleetCursor.decode(cursor.encode()) == cursor
    for bad in ("42", "fw1.", "fw1.bm90IGpzb24", FleetCursor(1.0, {"h": "x1"}).encode()):
        with pytest.raises(MetaldError) as refused:
            FleetCursor.decode(bad)
        assert refused.value.metadata["field"] == "after_cursor"
