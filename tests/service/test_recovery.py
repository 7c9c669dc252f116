"""Recovery in process, one test per row of metald/domain/recovery.py's table: a record left in
(state, pending operation) by a daemon killed halfway, a VMM alive or gone, then a restart."""

from __future__ import annotations

import logging

import pytest

from metald.domain.events import VmEventType
from metald.domain.model import Vm
from metald.domain.pending import PendingOp
from metald.domain.states import VmState
from tests.service.conftest import CUSTOMER, NAMESPACE_GONE, NIC, World

S = VmState
P = PendingOp


async def _left_behind(world: World, state: VmState, pending: PendingOp, *, alive: bool) -> Vm:
    """What a daemon killed halfway leaves: a record in (state, pending), a VMM or none."""
    await world.create("vm-a", NIC)
    if alive or state in (S.RUNNING, S.PAUSED):
        await world.boot("vm-a")
        if state is S.PAUSED:
            await world.service.pause(CUSTOMER, "vm-a")
    vm = await world.vm("vm-a")
    assert vm is not None
    vm.state, vm.pending = state, pending
    await world.store.vms.save(vm)
    if not alive:
        world.backend.host_reboot()
        world.network.host_reboot()
    return vm


@pytest.mark.parametrize(
    ("state", "pending", "alive", "after", "running"),
    [
        (S.CREATED, P.BOOTING, True, S.RUNNING, True),  # ADOPT
        (S.SHUTDOWN, P.BOOTING, True, S.RUNNING, True),  # ADOPT
        (S.CREATED, P.BOOTING, False, S.CREATED, False),  # UNDO_BOOT
        (S.SHUTDOWN, P.BOOTING, False, S.SHUTDOWN, False),  # UNDO_BOOT
        (S.RUNNING, P.STOPPING, True, S.SHUTDOWN, False),  # FINISH_STOP
        (S.RUNNING, P.STOPPING, False, S.SHUTDOWN, False),  # RECORD_SHUTDOWN
        (S.RUNNING, P.NONE, True, S.RUNNING, True),  # ADOPT
        (S.PAUSED, P.NONE, True, S.PAUSED, True),  # ADOPT
        (S.RUNNING, P.NONE, False, S.SHUTDOWN, False),  # RECORD_SHUTDOWN (host reboot)
        (S.PAUSED, P.NONE, False, S.SHUTDOWN, False),  # RECORD_SHUTDOWN (host reboot)
        (S.CREATED, P.NONE, False, S.CREATED, False),  # NOTHING
    ],
)
async def test_row(
    world: World, state: VmState, pending: PendingOp, alive: bool, after: VmState, running: bool
) -> None:
    await _left_behind(world, state, pending, alive=alive)
    await world.restart()
    vm = await world.vm("vm-a")
    assert vm is not None and vm.state is after and not vm.pending
    assert ("vm-a" in world.backend.vmms) is running
    assert ("vm-a" in world.network.attached) is running  # the orphan sweep keeps only live VMs
    if after is S.SHUTDOWN and state is not S.SHUTDOWN:
        assert vm.shutdown_reason


@pytest.mark.parametrize("pending", [P.CREATING, P.DELETING])
async def test_rows_that_remove_the_vm(world: World, pending: PendingOp) -> None:
    await _left_behind(world, S.CREATED, pending, alive=False)
    await world.restart()
    assert await world.vm("vm-a") is None
    assert "vm-a" not in world.network.planned and "vm-a" not in world.backend.prepared


async def test_a_vm_at_rest_costs_no_vmm_probe(world: World) -> None:
    await world.create("vm-a")
    await world.restart()
    assert world.backend.faults.calls["adopt"] == 0


async def test_readoption_and_vanished_vmms_are_events(world: World) -> None:
    await _left_behind(world, S.RUNNING, P.NONE, alive=True)
    await world.restart()
    adopted = (await world.events_of("vm-a"))[-1]
    assert (adopted.type, adopted.state, adopted.reason) == (
        VmEventType.STATE_CHANGED,
        S.RUNNING,
        "readopted",
    )
    await world.restart(host_reboot=True)
    assert await world.last_event("vm-a") == (
        VmEventType.EXITED,
        S.SHUTDOWN,
        S.RUNNING,
        "vmm_gone_while_daemon_down",
    )


async def test_host_reboot(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 11: after a host reboot (VMMs and namespaces gone, teardown failing) every VM is
    SHUTDOWN with a reason, boots again with its network rebuilt, and deletes, forced or not."""
    for vm_id in ("vm-a", "vm-b", "vm-c"):
        await world.create(vm_id, NIC)
        await world.boot(vm_id)
    await world.service.pause(CUSTOMER, "vm-b")
    world.network.faults.fail("detach", NAMESPACE_GONE, times=0)
    world.network.faults.fail("describe", NAMESPACE_GONE, times=0)
    world.network.faults.fail("remove_orphans", NAMESPACE_GONE, times=0)
    with caplog.at_level(logging.INFO, logger="metald"):
        await world.restart(host_reboot=True)
    assert "recovery of" not in " ".join(r.getMessage() for r in caplog.records if "failed" in r.getMessage())
    for vm_id in ("vm-a", "vm-b", "vm-c"):
        vm = await world.vm(vm_id)
        assert vm is not None and (vm.state, vm.shutdown_reason) == (S.SHUTDOWN, "vmm_gone_while_daemon_down")
    assert (await world.boot("vm-a")).state is S.RUNNING
    assert "vm-a" in world.network.attached  # rebuilt at boot
    await world.service.delete(CUSTOMER, "vm-a", force=True)
    await world.service.delete(CUSTOMER, "vm-b", force=False)
    await world.service.delete(CUSTOMER, "vm-c", force=True)
    assert not world.network.planned and not world.backend.vmms and not world.backend.prepared


async def test_a_vmm_probe_that_fails_is_logged_and_leaves_the_record(world: World) -> None:
    await _left_behind(world, S.RUNNING, P.NONE, alive=True)
    world.backend.faults.fail("adopt", RuntimeError("qmp confused"))
    await world.restart()
    vm = await world.vm("vm-a")
    assert vm is not None and vm.state is S.RUNNING  # not declared dead on a probe failure
    assert "vm-a" in world.network.attached  # nor its network swept as an orphan
