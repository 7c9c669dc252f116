"""Snapshots and clones in process: SnapshotVm's steps, ownership, quotas, clones' first boot,
deletion that keeps files for the last clone, and recovery of a snapshot cut short."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.model import CpuConfig, VmConfig
from metald.domain.pending import PendingOp
from metald.domain.states import VmState
from metald.testing import FakeBackend
from tests.service.conftest import CUSTOMER, NIC, World, code_of

S = VmState


async def _running(world: World, vm_id: str = "vm-src", config: VmConfig = NIC) -> None:
    await world.create(vm_id, config)
    await world.boot(vm_id)


async def _snap(world: World, vm_id: str = "vm-src", snapshot_id: str = "snap-1") -> str:
    taken = await world.service.snapshot(CUSTOMER, vm_id, snapshot_id, {"k": "v"}, 0)
    return taken.snapshot.snapshot_id


async def test_a_running_vm_is_snapshotted_and_runs_on(world: World) -> None:
    await _running(world)
    taken = await world.service.snapshot(CUSTOMER, "vm-src", "", {"role": "template"}, 1)
    assert taken.snapshot.snapshot_id.startswith("snap_") and taken.vm_state is S.RUNNING
    assert taken.snapshot.size_bytes == 4096 and len(taken.snapshot.config.network) == 1
    vm = await world.vm("vm-src")
    assert vm is not None and vm.state is S.RUNNING and vm.pending == PendingOp.NONE
    files = world.tmp / "snapshots" / taken.snapshot.snapshot_id
    assert (files / "source").read_text() == "vm-src"
    assert [p.name for p in (world.tmp / "snapshots").iterdir()] == [taken.snapshot.snapshot_id]
    assert world.events.snapshot_pauses == [0.001]
    page = await world.service.list_snapshots(CUSTOMER, 0, "")
    assert [s.snapshot_id for s in page.snapshots] == [taken.snapshot.snapshot_id] and page.total_count == 1
    assert page.snapshots[0].metadata == {"role": "template"} and page.snapshots[0].warm_pool_size == 1


async def test_a_paused_vm_stays_paused(world: World) -> None:
    await _running(world)
    await world.service.pause(CUSTOMER, "vm-src")
    taken = await world.service.snapshot(CUSTOMER, "vm-src", "snap-p", {}, 0)
    assert taken.vm_state is S.PAUSED and world.backend.vmms["vm-src"].paused


async def test_refusals(world: World) -> None:
    await world.create("vm-new")
    with pytest.raises(MetaldError) as e:
        await _snap(world, "vm-new")
    assert code_of(e) == (ErrorCode.FAILED_PRECONDITION, "INVALID_STATE")
    await _running(world)
    with pytest.raises(MetaldError) as e:
        await world.service.snapshot("other", "vm-src", "", {}, 0)
    assert code_of(e) == (ErrorCode.PERMISSION_DENIED, "VM_NOT_OWNED")
    with pytest.raises(MetaldError) as e:
        await world.service.snapshot(CUSTOMER, "vm-src", "bad id!", {}, 0)
    assert e.value.code is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(MetaldError) as e:
        await world.service.snapshot(CUSTOMER, "vm-src", "", {}, 3)
    assert e.value.metadata.get("field") == "warm_pool_size"
    await _snap(world)
    with pytest.raises(MetaldError) as e:
        await _snap(world)
    assert code_of(e) == (ErrorCode.ALREADY_EXISTS, "SNAPSHOT_EXISTS")
    for i in (2, 3):
        await _snap(world, snapshot_id=f"snap-{i}")
    with pytest.raises(MetaldError) as e:
        await _snap(world, snapshot_id="snap-4")
    assert code_of(e) == (ErrorCode.RESOURCE_EXHAUSTED, "SNAPSHOT_QUOTA_EXCEEDED")
    with pytest.raises(MetaldError) as e:
        await world.service.create("other", "vm-x", NIC, "", snapshot_id="snap-1")
    assert code_of(e) == (ErrorCode.PERMISSION_DENIED, "SNAPSHOT_NOT_OWNED")
    with pytest.raises(MetaldError) as e:
        await world.service.create(CUSTOMER, "vm-x", NIC, "", snapshot_id="snap-none")
    assert code_of(e) == (ErrorCode.NOT_FOUND, "SNAPSHOT_NOT_FOUND")
    with pytest.raises(MetaldError) as e:
        await world.service.create(CUSTOMER, "vm-x", dataclasses.replace(NIC, cpu=CpuConfig(4)), "", "snap-1")
    assert e.value.metadata.get("field") == "config.cpu.vcpu_count"


async def test_without_snapshot_support_the_rpcs_say_so(world: World) -> None:
    backend = FakeBackend()
    backend.capabilities = dataclasses.replace(backend.capabilities, supports_snapshots=False)
    world.backend = backend
    service = world.make_service()
    for call in (
        service.snapshot(CUSTOMER, "vm-src", "", {}, 0),
        service.list_snapshots(CUSTOMER, 0, ""),
        service.delete_snapshot(CUSTOMER, "snap-1"),
    ):
        with pytest.raises(MetaldError) as e:
            await call
        assert code_of(e) == (ErrorCode.FAILED_PRECONDITION, "SNAPSHOTS_UNSUPPORTED")


async def test_a_clone_restores_at_its_first_boot_only(world: World) -> None:
    await _running(world)
    snap = await _snap(world)
    clone = await world.service.create(CUSTOMER, "vm-clone", NIC, "", snapshot_id=snap)
    assert clone.snapshot_id == snap and clone.config.cpu == (await world.vm("vm-src")).config.cpu  # type: ignore[union-attr]
    await world.boot("vm-clone")
    assert world.backend.vmms["vm-clone"].spec.restore_from == world.tmp / "snapshots" / snap
    details = await world.service.info(CUSTOMER, "vm-clone")
    assert details.vm.snapshot_id == snap
    await world.service.shutdown(CUSTOMER, "vm-clone", force=True, timeout_seconds=0)
    await world.boot("vm-clone")
    assert world.backend.vmms["vm-clone"].spec.restore_from is None  # its RAM is gone: a cold boot


async def test_a_deleted_snapshot_vanishes_but_keeps_its_files_for_its_clones(world: World) -> None:
    await _running(world)
    snap = await _snap(world)
    await world.service.create(CUSTOMER, "vm-clone", NIC, "", snapshot_id=snap)
    await world.service.delete_snapshot(CUSTOMER, snap)
    assert (await world.service.list_snapshots(CUSTOMER, 0, "")).total_count == 0
    with pytest.raises(MetaldError) as e:
        await world.service.delete_snapshot(CUSTOMER, snap)
    assert e.value.code is ErrorCode.NOT_FOUND
    files = world.tmp / "snapshots" / snap
    assert files.exists()
    await world.boot("vm-clone")  # the clone still restores from the kept files
    await world.service.delete(CUSTOMER, "vm-clone", force=True)
    assert not files.exists()
    assert await world.store.snapshots.all_snapshots() == []


async def test_a_failed_save_leaves_nothing(world: World) -> None:
    await _running(world)
    world.backend.faults.fail("snapshot", OSError(5, "I/O error"))
    with pytest.raises(MetaldError):
        await _snap(world)
    assert list((world.tmp / "snapshots").iterdir()) == []
    assert await world.store.snapshots.all_snapshots() == []
    vm = await world.vm("vm-src")
    assert vm is not None and vm.state is S.RUNNING and vm.pending == PendingOp.NONE


async def test_a_daemon_killed_during_a_snapshot_undoes_it_and_resumes_the_source(world: World) -> None:
    await _running(world)
    gate = world.backend.faults.hold("snapshot")
    taking = asyncio.create_task(_snap(world))
    await world.backend.faults.entered["snapshot"].wait()
    world.backend.vmms["vm-src"].paused = True  # stopped for the save when the daemon died
    taking.cancel()  # the old service goes away mid-save; its record and marks stay behind
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await taking
    # Cancellation ran the undo; leave what a kill -9 leaves instead, then restart.
    vm = await world.vm("vm-src")
    assert vm is not None
    vm.pending = PendingOp.SNAPSHOTTING
    await world.store.vms.save(vm)
    (world.tmp / "snapshots" / ".tmp-snap-2").mkdir()
    from metald.domain.snapshots import PENDING_CREATING, Snapshot

    await world.store.snapshots.insert(
        Snapshot("snap-2", CUSTOMER, "vm-src", vm.config, vm.created_at, pending=PENDING_CREATING)
    )
    service = await world.restart()
    vm = await world.vm("vm-src")
    assert vm is not None and vm.state is S.RUNNING and vm.pending == PendingOp.NONE
    assert not world.backend.vmms["vm-src"].paused
    assert list((world.tmp / "snapshots").iterdir()) == []
    assert (await service.list_snapshots(CUSTOMER, 0, "")).total_count == 0


async def test_snapshots_page_with_signed_tokens(world: World) -> None:
    world.max_snapshots = 0
    world.service = world.make_service()
    await _running(world)
    for i in range(5):
        await _snap(world, snapshot_id=f"snap-{i}")
    seen: list[str] = []
    token = ""
    while True:
        page = await world.service.list_snapshots(CUSTOMER, 2, token)
        seen += [s.snapshot_id for s in page.snapshots]
        assert page.total_count == 5
        if not (token := page.next_page_token):
            break
    assert seen == [f"snap-{i}" for i in range(5)]
    with pytest.raises(MetaldError) as e:
        await world.service.list_snapshots(
            "other", 2, (await world.service.list_snapshots(CUSTOMER, 2, "")).next_page_token
        )
    assert e.value.metadata.get("field") == "page_token"


async def _left_mid_save(world: World, *, paused: bool, vmm_paused: bool) -> None:
    """What a kill -9 during SnapshotVm leaves: the source marked SNAPSHOTTING, its VMM stopped or
    not (the save stops it; QEMU's `cont` then `stop` of a paused VM may have half happened)."""
    await _running(world)
    if paused:
        await world.service.pause(CUSTOMER, "vm-src")
    vm = await world.vm("vm-src")
    assert vm is not None
    vm.pending = PendingOp.SNAPSHOTTING
    await world.store.vms.save(vm)
    world.backend.vmms["vm-src"].paused = vmm_paused


@pytest.mark.parametrize(
    ("paused", "vmm_paused"), [(False, True), (False, False), (True, False), (True, True)]
)
async def test_a_source_cut_mid_save_is_back_in_its_state_with_its_network(
    world: World, paused: bool, vmm_paused: bool
) -> None:
    await _left_mid_save(world, paused=paused, vmm_paused=vmm_paused)
    await world.restart()
    vm = await world.vm("vm-src")
    assert vm is not None and vm.state is (S.PAUSED if paused else S.RUNNING) and not vm.pending
    assert world.backend.vmms["vm-src"].paused is paused
    assert "vm-src" in world.network.attached  # a live VM: the orphan sweep keeps its network


async def test_a_clone_cut_mid_restore_is_undone_with_fresh_disks(world: World) -> None:
    await _running(world)
    await _snap(world)
    await world.service.create(CUSTOMER, "vm-clone", NIC, CUSTOMER, snapshot_id="snap-1")
    await world.boot("vm-clone")
    clone_dir = world.tmp / "vms" / "vm-clone"
    (clone_dir / "written-by-the-restored-guest").write_text("x")
    vm = await world.vm("vm-clone")
    assert vm is not None
    vm.state, vm.pending = S.CREATED, PendingOp.RESTORING  # as BootVm left it, the VMM running
    await world.store.vms.save(vm)
    await world.restart()
    vm = await world.vm("vm-clone")
    assert vm is not None and vm.state is S.CREATED and not vm.pending
    assert "vm-clone" not in world.backend.vmms and "vm-clone" not in world.network.attached
    assert "vm-clone" in world.backend.prepared and not (clone_dir / "written-by-the-restored-guest").exists()
    await world.boot("vm-clone")  # restores again
    assert (await world.vm("vm-clone")).state is S.RUNNING  # type: ignore[union-attr]


async def test_a_failed_restore_leaves_fresh_disks(world: World) -> None:
    await _running(world)
    await _snap(world)
    await world.service.create(CUSTOMER, "vm-clone", NIC, CUSTOMER, snapshot_id="snap-1")
    clone_dir = world.tmp / "vms" / "vm-clone"
    (clone_dir / "stale").write_text("x")
    world.network.faults.fail("attach", OSError(5, "I/O error"))
    with pytest.raises(MetaldError):
        await world.boot("vm-clone")
    vm = await world.vm("vm-clone")
    assert vm is not None and vm.state is S.CREATED and not vm.pending
    assert not (clone_dir / "stale").exists() and "vm-clone" in world.backend.prepared


async def test_snapshot_files_no_record_names_are_removed_at_start(world: World) -> None:
    await _running(world)
    await _snap(world)
    (world.tmp / "snapshots" / "snap-ghost").mkdir()
    (world.tmp / "snapshots" / ".tmp-snap-gone").mkdir()
    await world.restart()
    assert sorted(p.name for p in (world.tmp / "snapshots").iterdir()) == ["snap-1"]
