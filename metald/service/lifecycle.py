"""Create, boot, pause, resume, reboot and delete; the VMM exit listener.

Each multi-step operation marks the VM pending (metald/domain/pending.py) before its first side
effect and clears it after the last, so a daemon killed halfway finishes or undoes it on restart
(metald/service/recovery.py). Operations on one VM are serialised by a per-VM lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from metald.domain import ids
from metald.domain.clones import clone_config
from metald.domain.errors import (
    ErrorCode,
    MetaldError,
    customer_mismatch,
    invalid,
    refusal,
    vm_exists,
    vm_exited,
)
from metald.domain.guest_args import guest_kernel_args
from metald.domain.model import Vm, VmConfig
from metald.domain.pending import PendingOp
from metald.domain.quotas import Usage, check_boot, check_create
from metald.domain.states import ACTIVE_STATES, TARGET, Operation, VmState, require_allowed
from metald.domain.validation import validate_config, with_defaults
from metald.ports import NetworkAttachment
from metald.service.pool import Pools
from metald.service.snapshots import restores

log = logging.getLogger("metald.service")

UNDO_RETRY_SECONDS = 1.0
# Longest BootVm(wait_for_ready) wait a caller may ask for (docs/api.md).
MAX_WAIT_TIMEOUT_SECONDS = 3600


class Lifecycle(Pools):
    # ---- create ----

    async def create(
        self, customer_id: str, vm_id: str, config: VmConfig, claimed_customer: str, snapshot_id: str = ""
    ) -> Vm:
        if claimed_customer and claimed_customer != customer_id:
            raise customer_mismatch(customer_id)
        if vm_id:
            ids.check_vm_id(vm_id)
        else:
            vm_id = ids.new_vm_id()
        if snapshot_id:  # a clone: the snapshot's machine, its own network, metadata and console
            config = clone_config(config, (await self._owned_snapshot(customer_id, snapshot_id)).config)
        validate_config(config, self._opts.limits)
        await self._require_disk_room()
        config = with_defaults(config, self._opts.defaults)
        self._check_capabilities(config)
        now = datetime.now(UTC)
        vm = Vm(vm_id, customer_id, config, VmState.CREATED, now, now, snapshot_id=snapshot_id)
        spec = await self._launch_spec(vm, None, stored=False)  # resolves and checks every host path first
        async with self._create_lock:
            if await self._vms.get(vm_id) is not None:
                raise vm_exists(vm_id)
            customer_vms, _, _ = await self._vms.usage(customer_id)
            host_vms, _, _ = await self._vms.usage(None)
            check_create(self._opts.quotas, customer_vms, host_vms)
            try:
                vm = await self._records.insert_creating(vm)
            except KeyError:
                raise vm_exists(vm_id) from None
        async with self._vm_lock(vm_id):
            try:
                network = self._networked(vm)
                if network is not None:
                    vm.nics = await network.plan(vm)
                    spec = dataclasses.replace(spec, guest_kernel_args=guest_kernel_args(vm_id, vm.nics))
                await self._backend_call("prepare", lambda: self._backend.prepare(spec))
                return await self._records.created(vm)
            except BaseException:
                await self._undo_create(vm)
                raise

    async def _undo_create(self, vm: Vm) -> None:
        """Remove a half-created VM; if that fails too (disk full), keep retrying in the background.
        Meanwhile the VM stays hidden (pending CREATING is neither listed nor found)."""
        try:
            await self._remove(vm)
        except Exception:
            log.warning("could not undo the create of %s yet; retrying", vm.vm_id, extra={"vm_id": vm.vm_id})
            self._spawn(self._retry_undo_create(vm))

    async def _retry_undo_create(self, vm: Vm) -> None:
        while True:
            await asyncio.sleep(UNDO_RETRY_SECONDS)
            async with self._vm_lock(vm.vm_id):
                with contextlib.suppress(Exception):
                    await self._remove(vm)
                    log.info("undid the create of %s", vm.vm_id, extra={"vm_id": vm.vm_id})
                    return

    # ---- boot ----

    async def boot(self, customer_id: str, vm_id: str, *, wait_for_ready: bool, wait_timeout: float) -> Vm:
        if wait_timeout < 0:
            raise invalid("wait_timeout_seconds", "must not be negative")
        if wait_timeout > MAX_WAIT_TIMEOUT_SECONDS:
            raise invalid("wait_timeout_seconds", f"must be at most {MAX_WAIT_TIMEOUT_SECONDS}")
        await self._owned(customer_id, vm_id)
        async with self._vm_lock(vm_id):
            vm = await self._owned(customer_id, vm_id)
            require_allowed(Operation.BOOT, vm_id, vm.state)
            await self._require_disk_room()
            started = time.monotonic()
            previous, previous_reason = vm.state, vm.shutdown_reason
            async with self._boot_lock:
                await self._capacity_check(vm)
                self._booting[vm_id] = vm
            restoring = restores(vm.state, vm.snapshot_id)
            try:
                await self._records.begin(vm, PendingOp.RESTORING if restoring else PendingOp.BOOTING)
                async with self._pool_slot(vm) as slot:
                    attachment = await self._attach(vm)
                    spec = dataclasses.replace(await self._launch_spec(vm, attachment), pool_slot=slot)
                    runtime = await self._backend_call("start", lambda: self._backend.start(spec))
                    self._count_pool_use(spec, runtime)
                if spec.restore_from is not None:
                    await self._refresh_clone(vm)
                vm = await self._records.settle(vm, VmState.RUNNING, reason="")
            except BaseException:
                await self._stop_quietly(vm)
                with contextlib.suppress(Exception):  # the original error is the one to report
                    if restoring:
                        await self._reset_clone(vm)
                    await self._records.restore(vm, previous, previous_reason)
                raise
            finally:
                self._booting.pop(vm_id, None)
            self._events.boot_finished(self.backend_type, time.monotonic() - started)
        if wait_for_ready:
            await self._wait_ready(vm_id, wait_timeout or self._opts.boot_wait_timeout)
        return vm

    async def _wait_ready(self, vm_id: str, timeout: float) -> None:
        try:
            ready = await self._backend.wait_ready(vm_id, timeout)
        except MetaldError as exc:
            if exc.reason == "VM_EXITED":  # record it now: the caller may look right after our answer
                await self._record_early_exit(vm_id, exc.metadata.get("exit_reason", ""))
            raise
        if not ready and await self._backend.runtime(vm_id) is None:
            reason = await self._record_early_exit(vm_id, "")
            raise vm_exited(vm_id, reason)
        if not ready:
            raise refusal(
                ErrorCode.DEADLINE_EXCEEDED,
                "GUEST_NOT_READY",
                f"VM {vm_id} is running but its guest did not report ready within {timeout:g}s",
                vm_id=vm_id,
            )
        self._spawn(self._note_guest_ready(vm_id))  # never waits behind another operation's lock

    async def _record_early_exit(self, vm_id: str, known: str) -> str:
        reason = self._backend.last_exit_reason(vm_id) or known or "vmm_exited"
        await self._on_vmm_exit(vm_id, reason)
        return reason

    async def _note_guest_ready(self, vm_id: str) -> None:
        async with self._vm_lock(vm_id):
            vm = await self._vms.get(vm_id)
            if vm is not None and vm.state is VmState.RUNNING and not vm.pending:
                await self._records.guest_ready(vm)

    async def _capacity_check(self, vm: Vm) -> None:
        """Called under the boot lock; boots in flight count as running, so concurrent boots
        cannot both take the last capacity."""
        active = sorted(ACTIVE_STATES)
        customer = Usage(*await self._vms.usage(vm.customer_id, active))
        host = Usage(*await self._vms.usage(None, active))
        for other in self._booting.values():
            host = _plus(host, other)
            if other.customer_id == vm.customer_id:
                customer = _plus(customer, other)
        check_boot(self._opts.quotas, customer, host, vm.config.vcpu_count, vm.config.memory_bytes)

    async def _attach(self, vm: Vm) -> NetworkAttachment | None:
        network = self._networked(vm)
        if network is None:
            return None
        return await self._backend_call("network_attach", lambda: network.attach(vm))

    async def _stop_quietly(self, vm: Vm) -> None:
        """Best-effort teardown after a failed boot: no VMM, no network left behind."""
        with contextlib.suppress(Exception):
            await self._backend.stop(vm.vm_id, graceful=False, timeout=0)
        await self._detach_tolerant(vm, "boot rollback")

    # ---- pause, resume, reboot ----

    async def _simple(
        self, customer_id: str, vm_id: str, op: Operation, action: Callable[[], Awaitable[None]]
    ) -> Vm:
        await self._owned(customer_id, vm_id)
        async with self._vm_lock(vm_id):
            vm = await self._owned(customer_id, vm_id)
            require_allowed(op, vm_id, vm.state)
            await self._require_disk_room()
            await self._backend_call(op.value, action)
            return await self._records.settle(vm, TARGET[op])

    async def pause(self, customer_id: str, vm_id: str) -> Vm:
        return await self._simple(customer_id, vm_id, Operation.PAUSE, lambda: self._backend.pause(vm_id))

    async def resume(self, customer_id: str, vm_id: str) -> Vm:
        return await self._simple(customer_id, vm_id, Operation.RESUME, lambda: self._backend.resume(vm_id))

    async def reboot(self, customer_id: str, vm_id: str, *, force: bool) -> Vm:
        return await self._simple(
            customer_id, vm_id, Operation.REBOOT, lambda: self._backend.reboot(vm_id, force=force)
        )

    # ---- delete ----

    async def _remove(self, vm: Vm) -> None:
        """Everything of the VM, then its record. Network teardown never blocks it: a VM whose
        namespace is gone (host reboot) or was never made (never booted) is still deleted."""
        await self._backend_call("destroy", lambda: self._backend.destroy(vm.vm_id, self._vm_dir(vm.vm_id)))
        network = self._networked(vm)
        if network is not None:
            if vm.pending != PendingOp.CREATING:  # a create never attached anything
                await self._detach_tolerant(vm, "delete")
            await network.release(vm)
        await self._records.deleted(vm)
        if vm.snapshot_id:  # maybe the last clone of a deleted snapshot: its files may go now
            await self.purge_unused_snapshots()

    # ---- the exit listener ----

    async def _on_vmm_exit(self, vm_id: str, reason: str) -> None:
        """A VMM ended by itself (guest poweroff, crash): record SHUTDOWN and clean its network."""
        async with self._vm_lock(vm_id):
            vm = await self._vms.get(vm_id)
            if vm is None or vm.state not in ACTIVE_STATES or vm.pending:
                return
            log.warning("VMM of %s exited without a request: %s", vm_id, reason, extra={"vm_id": vm_id})
            self._events.vm_exited(reason)
            await self._detach_tolerant(vm, "exit")
            await self._records.exited(vm, reason)


def _plus(usage: Usage, vm: Vm) -> Usage:
    return Usage(
        usage.vms + 1, usage.vcpus + vm.config.vcpu_count, usage.memory_bytes + vm.config.memory_bytes
    )
