"""CreateVm in process: every rollback path leaves nothing behind, and no ghost id."""

from __future__ import annotations

import asyncio

import pytest

from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.events import VmEventType
from metald.domain.quotas import Quotas
from metald.domain.states import VmState
from tests.service.conftest import CUSTOMER, NAMESPACE_GONE, NIC, World, open_world


async def test_create_records_the_vm_and_a_created_event(world: World) -> None:
    vm = await world.create("vm-a", NIC)
    assert vm.state is VmState.CREATED and not vm.pending
    assert vm.nics and world.network.planned["vm-a"] == vm.nics
    assert "vm-a" in world.backend.prepared
    [event] = await world.events_of("vm-a")
    assert event.type is VmEventType.CREATED and event.state is VmState.CREATED


async def _assert_gone(world: World, vm_id: str) -> None:
    assert await world.vm(vm_id) is None
    assert vm_id not in world.backend.prepared
    assert vm_id not in world.network.planned
    assert not (world.tmp / "vms" / vm_id).exists()
    with pytest.raises(MetaldError) as exc:
        await world.service.info(CUSTOMER, vm_id)
    assert exc.value.code is ErrorCode.NOT_FOUND
    # a watcher saw it come and go: every CREATED event is followed by its DELETED
    assert [(e.type, e.reason) for e in await world.events_of(vm_id)][-2:] == [
        (VmEventType.CREATED, ""),
        (VmEventType.DELETED, "create_undone"),
    ]


@pytest.mark.parametrize("step", ["plan", "prepare"])
async def test_a_failed_step_undoes_the_create(world: World, step: str) -> None:
    fakes = world.network if step == "plan" else world.backend
    fakes.faults.fail(step, MetaldError(ErrorCode.INTERNAL, f"{step} broke"))
    with pytest.raises(MetaldError, match=f"{step} broke"):
        await world.create("vm-a", NIC)
    await _assert_gone(world, "vm-a")
    await world.create("vm-a", NIC)  # the id is free again


async def test_refused_create_leaves_no_ghost_when_the_host_namespace_is_missing(world: World) -> None:
    """Issue 11: network planning refuses the VM on a daemon whose host namespace does not exist
    yet (teardown would fail): the id must not stay taken nor count against the quota."""
    w = await open_world(world.tmp / "quota", Quotas(max_vms_per_customer=1))
    try:
        w.network.faults.fail("detach", NAMESPACE_GONE, times=0)
        w.network.faults.fail("plan", MetaldError(ErrorCode.INVALID_ARGUMENT, "rate limit too large"))
        with pytest.raises(MetaldError, match="rate limit"):
            await w.create("vm-a", NIC)
        await _assert_gone(w, "vm-a")
        await w.create("vm-a", NIC)  # neither ALREADY_EXISTS nor over the quota of one
    finally:
        await w.close()


async def test_an_undo_that_fails_is_retried_and_the_vm_stays_hidden(world: World) -> None:
    world.backend.faults.fail("prepare", OSError("disk"))
    world.backend.faults.fail("destroy", OSError("disk still"), times=2)
    with pytest.raises(MetaldError):
        await world.create("vm-a")
    stored = await world.vm("vm-a")
    assert stored is not None and stored.pending == "creating"
    listed = await world.service.list(CUSTOMER, [], 0, "")
    assert listed.vms == [] and listed.total_count == 0
    with pytest.raises(MetaldError) as exc:
        await world.service.info(CUSTOMER, "vm-a")
    assert exc.value.code is ErrorCode.NOT_FOUND
    for _ in range(60):  # retried every UNDO_RETRY_SECONDS
        if await world.vm("vm-a") is None:
            break
        await asyncio.sleep(0.1)
    await _assert_gone(world, "vm-a")


async def test_duplicate_and_quota(world: World) -> None:
    await world.create("vm-a")
    with pytest.raises(MetaldError) as exc:
        await world.create("vm-a")
    assert exc.value.reason == "VM_EXISTS"
    w = await open_world(world.tmp / "quota", Quotas(max_vms_per_customer=1))
    try:
        await w.create("vm-b")
        with pytest.raises(MetaldError) as exc:
            await w.create("vm-c")
        assert exc.value.code is ErrorCode.RESOURCE_EXHAUSTED
        await w.create("vm-c", customer="other")  # per customer
    finally:
        await w.close()


async def test_capabilities_refused_before_anything_exists(world: World) -> None:
    from metald.domain.model import CpuConfig, VmConfig

    with pytest.raises(MetaldError) as exc:
        await world.create("vm-a", VmConfig(cpu=CpuConfig(cpu_template="nope")))
    assert exc.value.code is ErrorCode.INVALID_ARGUMENT
    assert await world.vm("vm-a") is None and world.backend.faults.calls["prepare"] == 0
