"""After a (re)start: carry out the decision table of metald/domain/recovery.py for every VM."""

from __future__ import annotations

import logging

from metald.domain.model import Vm
from metald.domain.pending import PendingOp
from metald.domain.recovery import VMM_GONE_REASON, RecoveryAction, rule
from metald.domain.states import VmState
from metald.ports import VmRuntime
from metald.service.snapshots import restores
from metald.service.stopping import Stopping

log = logging.getLogger("metald.service")
A = RecoveryAction


class Recovery(Stopping):
    async def recover(self) -> None:
        """Finish or undo half-done operations, re-adopt running VMMs, record the vanished ones."""
        await self.recover_snapshots()
        live: set[str] = set()
        for vm in await self._vms.all_vms():
            try:
                if await self._recover_one(vm):
                    live.add(vm.vm_id)
            except Exception:
                live.add(vm.vm_id)  # unknown: keep its devices rather than sweep a running VM's
                log.exception("recovery of %s failed", vm.vm_id, extra={"vm_id": vm.vm_id})
        if self._network is not None:
            try:
                removed = await self._network.remove_orphans(live)
            except Exception as exc:
                log.warning("could not remove orphaned network devices: %s", exc)
            else:
                if removed:
                    log.info("removed orphaned network devices: %s", ", ".join(removed))

    async def _recover_one(self, vm: Vm) -> bool:
        """Returns True if the VM's VMM runs after recovery."""
        async with self._vm_lock(vm.vm_id):
            r = rule(vm.state, PendingOp.of(vm.pending))
            runtime = await self._probe(vm) if r.needs_probe else None
            action = r.when_alive if runtime is not None else r.when_gone
            if action is not A.NOTHING:
                log.info("recovery of %s: %s", vm.vm_id, action.value, extra={"vm_id": vm.vm_id})
            await self._carry_out(vm, action, runtime)
            return action in (A.ADOPT, A.RESUME_SOURCE)

    async def _probe(self, vm: Vm) -> VmRuntime | None:
        """Re-attach to the VM's VMM if it really still runs."""
        attachment = None
        network = self._networked(vm)
        if network is not None:
            try:
                attachment = await network.describe(vm)
            except Exception as exc:  # e.g. its namespace is gone after a host reboot
                log.info("no network of %s to describe: %s", vm.vm_id, exc, extra={"vm_id": vm.vm_id})
        return await self._backend.adopt(await self._launch_spec(vm, attachment))

    async def _carry_out(self, vm: Vm, action: RecoveryAction, runtime: VmRuntime | None) -> None:
        if action is A.UNDO_CREATE:
            await self._undo_create(vm)
        elif action is A.FINISH_DELETE:
            await self._remove(vm)
        elif action is A.ADOPT:
            assert runtime is not None
            if vm.pending == PendingOp.BOOTING and restores(vm.state, vm.snapshot_id):
                await self._refresh_clone(vm)  # the kill may have come between restore and refresh
            await self._records.readopted(vm, VmState.PAUSED if runtime.paused else VmState.RUNNING)
            log.info("re-adopted %s (pid %d)", vm.vm_id, runtime.pid, extra={"vm_id": vm.vm_id})
        elif action is A.RESUME_SOURCE:
            assert runtime is not None
            await self._resume_source(vm, runtime)
            await self._records.readopted(vm, vm.state)
        elif action is A.UNDO_RESTORE:
            await self._reset_clone(vm)  # kills a VMM left running too
            await self._detach_tolerant(vm, "recovery")
            await self._records.restore(vm, vm.state, vm.shutdown_reason)
        elif action is A.UNDO_BOOT:
            await self._detach_tolerant(vm, "recovery")
            await self._records.restore(vm, vm.state, vm.shutdown_reason)
        elif action is A.FINISH_STOP:
            reason = await self._kill(vm.vm_id)
            await self._detach_tolerant(vm, "recovery")
            await self._records.settle(vm, VmState.SHUTDOWN, reason=reason)
        elif action is A.RECORD_SHUTDOWN:
            await self._detach_tolerant(vm, "recovery")
            await self._records.exited(vm, self._backend.last_exit_reason(vm.vm_id) or VMM_GONE_REASON)

    async def _resume_source(self, vm: Vm, runtime: VmRuntime) -> None:
        """Back in its state after a save cut short. A VMM stopped by the save but not reported
        paused (QEMU's "postmigrate", "finish-migrate") is resumed all the same; a PAUSED VM that
        the save left running, or in "postmigrate" (where it could take no further snapshot), is
        resumed and paused again."""
        if vm.state is VmState.RUNNING:
            await self._backend.resume(vm.vm_id)
        elif not runtime.paused:
            await self._backend.resume(vm.vm_id)
            await self._backend.pause(vm.vm_id)
