"""The exit listener: a VMM that ends by itself is recorded SHUTDOWN with its reason, once."""

from __future__ import annotations

from metald.domain.events import VmEventType
from metald.domain.states import VmState
from tests.service.conftest import CUSTOMER, NAMESPACE_GONE, NIC, World


async def test_a_crash_is_recorded_with_its_reason(world: World) -> None:
    await world.create("vm-a", NIC)
    await world.boot("vm-a")
    await world.service.pause(CUSTOMER, "vm-a")
    await world.backend.crash("vm-a", "oom_killed")
    vm = await world.vm("vm-a")
    assert vm is not None and (vm.state, vm.shutdown_reason) == (VmState.SHUTDOWN, "oom_killed")
    assert "vm-a" not in world.network.attached
    assert world.events.exits["oom_killed"] == 1
    assert await world.last_event("vm-a") == (
        VmEventType.EXITED,
        VmState.SHUTDOWN,
        VmState.PAUSED,
        "oom_killed",
    )
    assert (await world.boot("vm-a")).state is VmState.RUNNING


async def test_a_failing_network_teardown_does_not_block_the_record(world: World) -> None:
    await world.create("vm-a", NIC)
    await world.boot("vm-a")
    world.network.faults.fail("detach", NAMESPACE_GONE, times=0)
    await world.backend.crash("vm-a", "guest_poweroff")
    vm = await world.vm("vm-a")
    assert vm is not None and vm.state is VmState.SHUTDOWN


async def test_an_exit_of_a_vm_being_stopped_is_left_to_the_stop(world: World) -> None:
    await world.create("vm-a")
    await world.boot("vm-a")
    await world.service.shutdown(CUSTOMER, "vm-a", force=True, timeout_seconds=0)
    await world.service._on_vmm_exit("vm-a", "late_notice")  # the pidfd's notice, after the stop
    vm = await world.vm("vm-a")
    assert vm is not None and vm.shutdown_reason == "killed"
    assert [e.type for e in await world.events_of("vm-a")].count(VmEventType.EXITED) == 0


async def test_an_exit_of_an_unknown_vm_is_ignored(world: World) -> None:
    await world.service._on_vmm_exit("vm-nobody", "guest_poweroff")
    assert world.events.exits == {}
