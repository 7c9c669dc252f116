"""BootVm in process: every rollback path, waiting for the guest, capacity under concurrent boots."""

from __future__ import annotations

import asyncio

import pytest

from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.events import VmEventType
from metald.domain.model import CpuConfig, VmConfig
from metald.domain.quotas import Quotas
from metald.domain.states import VmState
from tests.service.conftest import CUSTOMER, NIC, World, open_world


async def test_boot_records_running_with_its_previous_state(world: World) -> None:
    await world.create("vm-a", NIC)
    vm = await world.boot("vm-a")
    assert vm.state is VmState.RUNNING and "vm-a" in world.backend.vmms and "vm-a" in world.network.attached
    event = (await world.events_of("vm-a"))[-1]
    assert (event.type, event.state, event.previous_state) == (
        VmEventType.STATE_CHANGED,
        VmState.RUNNING,
        VmState.CREATED,
    )


@pytest.mark.parametrize(("fakes", "step"), [("network", "attach"), ("backend", "start")])
async def test_a_failed_boot_is_undone(world: World, fakes: str, step: str) -> None:
    await world.create("vm-a", NIC)
    getattr(world, fakes).faults.fail(step, MetaldError(ErrorCode.INTERNAL, f"{step} broke"))
    before = len(await world.events_of("vm-a"))
    with pytest.raises(MetaldError, match=f"{step} broke"):
        await world.boot("vm-a")
    vm = await world.vm("vm-a")
    assert vm is not None and vm.state is VmState.CREATED and not vm.pending
    assert "vm-a" not in world.backend.vmms and "vm-a" not in world.network.attached
    assert len(await world.events_of("vm-a")) == before  # nothing a watcher saw changed
    assert (await world.boot("vm-a")).state is VmState.RUNNING


async def test_a_failed_boot_after_a_shutdown_keeps_the_shutdown_reason(world: World) -> None:
    await world.create("vm-a")
    await world.boot("vm-a")
    await world.backend.crash("vm-a", "oom_killed")
    world.backend.faults.fail("start", MetaldError(ErrorCode.INTERNAL, "no"))
    with pytest.raises(MetaldError):
        await world.boot("vm-a")
    vm = await world.vm("vm-a")
    assert vm is not None and (vm.state, vm.shutdown_reason) == (VmState.SHUTDOWN, "oom_killed")


async def test_a_boot_cancelled_halfway_is_undone(world: World) -> None:
    """A client that goes away mid-boot: the boot task is cancelled; nothing stays half-done."""
    await world.create("vm-a", NIC)
    gate = world.backend.faults.hold("start")
    boot = asyncio.create_task(world.boot("vm-a"))
    await world.backend.faults.entered["start"].wait()
    boot.cancel()
    with pytest.raises(asyncio.CancelledError):
        await boot
    gate.set()
    vm = await world.vm("vm-a")
    assert vm is not None and vm.state is VmState.CREATED and not vm.pending
    assert "vm-a" not in world.network.attached


async def test_wait_for_ready_records_guest_ready(world: World) -> None:
    await world.create("vm-a")
    await world.boot("vm-a", wait_for_ready=True)
    await world.settle()
    assert (await world.events_of("vm-a"))[-1].type is VmEventType.GUEST_READY


async def test_a_silent_guest_times_out(world: World) -> None:
    await world.create("vm-a")
    world.backend.guest = "silent"
    with pytest.raises(MetaldError) as exc:
        await world.boot("vm-a", wait_for_ready=True, wait_timeout=0.05)
    assert (exc.value.code, exc.value.reason) == (ErrorCode.DEADLINE_EXCEEDED, "GUEST_NOT_READY")


async def test_a_guest_that_powers_off_at_once_is_reported_not_waited_for(world: World) -> None:
    """Issue 11: BootVm(wait_for_ready) of a guest that exits right away says so; the VM ends
    SHUTDOWN with the reason, before the caller gets the answer."""
    await world.create("vm-a", NIC)
    world.backend.guest = "poweroff"
    with pytest.raises(MetaldError) as exc:
        await world.boot("vm-a", wait_for_ready=True, wait_timeout=30)
    assert (exc.value.code, exc.value.reason) == (ErrorCode.FAILED_PRECONDITION, "VM_EXITED")
    vm = await world.vm("vm-a")
    assert vm is not None and (vm.state, vm.shutdown_reason) == (VmState.SHUTDOWN, "guest_poweroff")
    assert "vm-a" not in world.network.attached
    await world.settle()
    exited = [e for e in await world.events_of("vm-a") if e.type is VmEventType.EXITED]
    assert len(exited) == 1 and exited[0].reason == "guest_poweroff"


@pytest.mark.parametrize("timeout", [-5, 3601])
async def test_a_bad_wait_timeout_is_refused_before_booting(world: World, timeout: float) -> None:
    await world.create("vm-a")
    with pytest.raises(MetaldError) as exc:
        await world.boot("vm-a", wait_for_ready=True, wait_timeout=timeout)
    assert exc.value.code is ErrorCode.INVALID_ARGUMENT
    assert exc.value.metadata["field"] == "wait_timeout_seconds"
    vm = await world.vm("vm-a")
    assert vm is not None and vm.state is VmState.CREATED and world.backend.faults.calls["start"] == 0


async def test_concurrent_boots_never_exceed_capacity(world: World) -> None:
    w = await open_world(world.tmp / "cap", Quotas(max_host_vcpus=4))
    try:
        config = VmConfig(cpu=CpuConfig(vcpu_count=2))
        vm_ids = [f"vm-{i}" for i in range(5)]
        for vm_id in vm_ids:
            await w.create(vm_id, config)
        gate = w.backend.faults.hold("start")  # every boot is in flight at once
        boots = [asyncio.create_task(w.boot(vm_id)) for vm_id in vm_ids]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(*boots, return_exceptions=True)
        ok = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, MetaldError)]
        assert len(ok) == 2 and len(refused) == 3
        assert all(r.code is ErrorCode.RESOURCE_EXHAUSTED for r in refused)
        assert len(w.backend.vmms) == 2
        page = await w.service.list(CUSTOMER, [VmState.CREATED], 0, "")
        assert page.total_count == 3  # the refused ones are untouched
    finally:
        await w.close()
