"""The one place that writes VM state: each transition is a typed method that saves the record and
the VmEvent describing it in one store write, then wakes the watchers.

Nothing else in the service calls the store's write methods, so every change a watcher can see
(requested, from the exit listener, from recovery) comes with its event.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from metald.domain.errors import MetaldError, exhausted
from metald.domain.events import VmEvent, VmEventType
from metald.domain.model import Vm
from metald.domain.pending import PendingOp
from metald.domain.states import VmState
from metald.ports import StoreFullError, VmRecords


class Notifier:
    """Wakes every watch waiting for the next event (in process). Take `waiter()` before reading
    the log, wait on it after: a write in between is never missed."""

    def __init__(self) -> None:
        self._next = asyncio.Event()

    def waiter(self) -> asyncio.Event:
        return self._next

    def notify(self) -> None:
        self._next.set()
        self._next = asyncio.Event()


class Transitions:
    def __init__(self, store: VmRecords) -> None:
        self._store = store
        self.notifier = Notifier()

    # ---- create ----

    async def insert_creating(self, vm: Vm) -> Vm:
        """A new record and its CREATED event; the VM stays hidden (pending CREATING) until
        `created`. Raises KeyError if the id is taken."""
        vm.pending = PendingOp.CREATING
        event = self._event(vm, VmEventType.CREATED, vm.state, VmState.UNSPECIFIED, "")
        try:
            vm = await self._store.insert(vm, event)
        except StoreFullError as exc:
            raise store_full(exc) from exc
        self.notifier.notify()
        return vm

    async def created(self, vm: Vm) -> Vm:
        """Every step of the create done: the VM can be found (its event was written at insert)."""
        return await self._write(vm, None, state=vm.state, pending=PendingOp.NONE)

    # ---- multi-step operations ----

    async def begin(self, vm: Vm, op: PendingOp) -> Vm:
        """Mark an operation in flight before its first side effect (no event: nothing changed yet)."""
        return await self._write(vm, None, state=vm.state, pending=op)

    async def settle(self, vm: Vm, state: VmState, *, reason: str | None = None) -> Vm:
        """A requested transition done: the new state, nothing in flight. `reason` replaces the
        shutdown reason when given (a boot clears it)."""
        kind = VmEventType.STATE_CHANGED if state is not vm.state or reason is not None else None
        return await self._write(vm, kind, state=state, pending=PendingOp.NONE, reason=reason)

    async def restore(self, vm: Vm, state: VmState, reason: str) -> Vm:
        """An operation undone: back to where it started (nothing a watcher saw changed)."""
        kind = VmEventType.STATE_CHANGED if state is not vm.state else None
        return await self._write(vm, kind, state=state, pending=PendingOp.NONE, reason=reason)

    async def exited(self, vm: Vm, reason: str) -> Vm:
        """The VMM ended without being asked (guest poweroff, crash, gone after a host reboot)."""
        return await self._write(
            vm, VmEventType.EXITED, state=VmState.SHUTDOWN, pending=PendingOp.NONE, reason=reason
        )

    async def readopted(self, vm: Vm, state: VmState) -> Vm:
        """After a restart the VMM still ran: recorded so watchers learn the daemon is back on it."""
        vm.shutdown_reason = ""
        return await self._write(
            vm, VmEventType.STATE_CHANGED, state=state, pending=PendingOp.NONE, note="readopted"
        )

    async def guest_ready(self, vm: Vm) -> None:
        await self._write(vm, VmEventType.GUEST_READY, state=vm.state, pending=vm.pending, note="guest_ready")

    # ---- delete ----

    async def deleted(self, vm: Vm) -> None:
        """The record is gone (a create undone too: every CREATED event gets its DELETED)."""
        vm.updated_at = datetime.now(UTC)
        why = "create_undone" if vm.pending == PendingOp.CREATING else "deleted"
        await self._store.delete(vm.vm_id, self._event(vm, VmEventType.DELETED, vm.state, vm.state, why))
        self.notifier.notify()

    # ---- the write ----

    async def _write(
        self,
        vm: Vm,
        kind: VmEventType | None,
        *,
        state: VmState,
        pending: PendingOp,
        reason: str | None = None,
        note: str = "",
    ) -> Vm:
        previous = vm.state
        vm.state, vm.pending = state, pending
        if reason is not None:
            vm.shutdown_reason = reason
        vm.updated_at = datetime.now(UTC)
        event = None
        if kind is not None:
            event = self._event(vm, kind, state, previous, note or vm.shutdown_reason)
        try:
            await self._store.save(vm, event)
        except StoreFullError as exc:
            raise store_full(exc) from exc
        if event is not None:
            self.notifier.notify()
        return vm

    @staticmethod
    def _event(vm: Vm, kind: VmEventType, state: VmState, previous: VmState, reason: str) -> VmEvent:
        return VmEvent(vm.vm_id, vm.customer_id, kind, state, previous, reason, vm.updated_at)


def store_full(exc: StoreFullError) -> MetaldError:
    return exhausted("STORE_FULL", f"the state store cannot write ({exc}); nothing was changed")
