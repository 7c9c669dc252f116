"""ShutdownVm and DeleteVm in process: a forced stop pre-empts a graceful one; delete always works."""

from __future__ import annotations

import asyncio

import pytest

from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.events import VmEventType
from metald.domain.states import VmState
from tests.service.conftest import CUSTOMER, NAMESPACE_GONE, NIC, World


async def _hostage(world: World) -> asyncio.Task[object]:
    """A running guest that ignores ACPI, and a graceful shutdown of it waiting 600 s."""
    await world.create("vm-a", NIC)
    world.backend.guest = "ignore_acpi"
    await world.boot("vm-a")
    graceful = asyncio.create_task(world.service.shutdown(CUSTOMER, "vm-a", force=False, timeout_seconds=600))
    await world.backend.faults.entered["stop"].wait()
    return graceful


async def test_a_forced_shutdown_preempts_a_graceful_one(world: World) -> None:
    graceful = await _hostage(world)
    forced = await asyncio.wait_for(
        world.service.shutdown(CUSTOMER, "vm-a", force=True, timeout_seconds=0), 2
    )
    assert forced.state is VmState.SHUTDOWN
    assert (await asyncio.wait_for(graceful, 2)).state is VmState.SHUTDOWN  # type: ignore[attr-defined]
    vm = await world.vm("vm-a")
    assert vm is not None and (vm.state, vm.shutdown_reason, vm.pending) == (VmState.SHUTDOWN, "killed", "")
    assert "vm-a" not in world.backend.vmms and "vm-a" not in world.network.attached


async def test_a_forced_delete_preempts_a_graceful_shutdown(world: World) -> None:
    graceful = await _hostage(world)
    await asyncio.wait_for(world.service.delete(CUSTOMER, "vm-a", force=True), 2)
    await asyncio.wait_for(graceful, 2)
    assert await world.vm("vm-a") is None and "vm-a" not in world.backend.vmms
    assert [e.type for e in await world.events_of("vm-a")][-2:] == [
        VmEventType.STATE_CHANGED,
        VmEventType.DELETED,
    ]


async def test_a_graceful_shutdown_ends_as_the_guest_powers_off(world: World) -> None:
    await world.create("vm-a")
    await world.boot("vm-a")
    vm = await world.service.shutdown(CUSTOMER, "vm-a", force=False, timeout_seconds=0)
    assert (vm.state, vm.shutdown_reason) == (VmState.SHUTDOWN, "guest_poweroff")
    event = (await world.events_of("vm-a"))[-1]
    assert (event.type, event.previous_state, event.reason) == (
        VmEventType.STATE_CHANGED,
        VmState.RUNNING,
        "guest_poweroff",
    )


@pytest.mark.parametrize("timeout", [-1, 601, 2**31 - 1])
async def test_the_graceful_timeout_is_bounded(world: World, timeout: float) -> None:
    await world.create("vm-a")
    await world.boot("vm-a")
    with pytest.raises(MetaldError) as exc:
        await world.service.shutdown(CUSTOMER, "vm-a", force=False, timeout_seconds=timeout)
    assert exc.value.code is ErrorCode.INVALID_ARGUMENT and exc.value.metadata["field"] == "timeout_seconds"
    assert "vm-a" in world.backend.vmms


async def test_delete_of_a_never_booted_vm_whose_namespaces_do_not_exist(world: World) -> None:
    """Issue 11: the host namespace does not exist yet, so teardown fails: delete still works."""
    await world.create("vm-a", NIC)
    world.network.faults.fail("detach", NAMESPACE_GONE, times=0)
    await world.service.delete(CUSTOMER, "vm-a", force=False)
    assert await world.vm("vm-a") is None and "vm-a" not in world.network.planned
    assert (await world.events_of("vm-a"))[-1].type is VmEventType.DELETED


async def test_a_forced_delete_of_a_running_vm_removes_everything(world: World) -> None:
    await world.create("vm-a", NIC)
    await world.boot("vm-a")
    with pytest.raises(MetaldError) as exc:
        await world.service.delete(CUSTOMER, "vm-a", force=False)
    assert exc.value.reason == "INVALID_STATE"
    await world.service.delete(CUSTOMER, "vm-a", force=True)
    assert await world.vm("vm-a") is None
    assert not world.backend.vmms and not world.network.attached and not world.network.planned
    assert not (world.tmp / "vms" / "vm-a").exists()


async def test_other_customers_are_refused(world: World) -> None:
    await world.create("vm-a")
    with pytest.raises(MetaldError) as exc:
        await world.service.delete("mallory", "vm-a", force=True)
    assert exc.value.code is ErrorCode.PERMISSION_DENIED
    assert await world.vm("vm-a") is not None
