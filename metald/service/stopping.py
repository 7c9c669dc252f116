"""ShutdownVm and DeleteVm. A forced stop always pre-empts a graceful one in flight: it cuts the
graceful wait short (the VMM is killed at once) instead of queueing behind it on the per-VM lock."""

from __future__ import annotations

import asyncio
from typing import Any

from metald.domain.errors import invalid
from metald.domain.model import Vm
from metald.domain.pending import PendingOp
from metald.domain.states import Operation, VmState, require_allowed
from metald.service.lifecycle import Lifecycle

# Longest graceful ShutdownVm a caller may ask for (docs/api.md); a forced stop pre-empts it anyway.
MAX_SHUTDOWN_TIMEOUT_SECONDS = 600


class Stopping(Lifecycle):
    def __init__(self, **ports: Any) -> None:
        super().__init__(**ports)
        self._graceful: dict[str, asyncio.Event] = {}  # set to cut a graceful stop short

    async def shutdown(self, customer_id: str, vm_id: str, *, force: bool, timeout_seconds: float) -> Vm:
        await self._owned(customer_id, vm_id)
        if timeout_seconds < 0:
            raise invalid("timeout_seconds", "must not be negative")
        if timeout_seconds > MAX_SHUTDOWN_TIMEOUT_SECONDS:
            raise invalid("timeout_seconds", f"must be at most {MAX_SHUTDOWN_TIMEOUT_SECONDS}")
        preempted = force and self._preempt(vm_id)
        async with self._vm_lock(vm_id):
            vm = await self._owned(customer_id, vm_id)
            if preempted and vm.state is VmState.SHUTDOWN:
                return vm  # the graceful stop we cut short ended as a forced one: what was asked
            require_allowed(Operation.SHUTDOWN, vm_id, vm.state)
            await self._require_disk_room()
            return await self._stop(vm, force=force, timeout=timeout_seconds or self._opts.shutdown_timeout)

    async def delete(self, customer_id: str, vm_id: str, *, force: bool) -> None:
        await self._owned(customer_id, vm_id)
        if force:
            self._preempt(vm_id)
        async with self._vm_lock(vm_id):
            vm = await self._owned(customer_id, vm_id)
            require_allowed(Operation.DELETE, vm_id, vm.state, force=force)
            await self._records.begin(vm, PendingOp.DELETING)
            await self._remove(vm)
        self._locks.pop(vm_id, None)

    def _preempt(self, vm_id: str) -> bool:
        cut = self._graceful.get(vm_id)
        if cut is None:
            return False
        cut.set()
        return True

    async def _stop(self, vm: Vm, *, force: bool, timeout: float) -> Vm:
        await self._records.begin(vm, PendingOp.STOPPING)
        reason = await (self._kill(vm.vm_id) if force else self._graceful_stop(vm.vm_id, timeout))
        await self._detach_tolerant(vm, "shutdown")
        return await self._records.settle(vm, VmState.SHUTDOWN, reason=reason)

    async def _kill(self, vm_id: str) -> str:
        return await self._backend_call("stop", lambda: self._backend.stop(vm_id, graceful=False, timeout=0))

    async def _graceful_stop(self, vm_id: str, timeout: float) -> str:
        cut = self._graceful[vm_id] = asyncio.Event()
        stop = asyncio.ensure_future(
            self._backend_call("stop", lambda: self._backend.stop(vm_id, graceful=True, timeout=timeout))
        )
        preempt = asyncio.ensure_future(cut.wait())
        try:
            await asyncio.wait({stop, preempt}, return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                return stop.result()
        finally:
            del self._graceful[vm_id]
            for task in (stop, preempt):
                task.cancel()
        await asyncio.wait({stop})  # the graceful wait, cancelled: its end is the kill's
        return await self._kill(vm_id)
