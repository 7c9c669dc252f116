"""Warm pool slots on QEMU: a clone's QEMU started ahead of time, waiting in `-incoming defer`.

A slot is a directory of its own (the service puts it under data_dir/pool) holding everything a
clone's first boot would make: its overlay over the snapshot's frozen one, its QMP and agent
sockets, its console log, the supervisor's state files. QEMU runs with the snapshot's RAM file
mapped copy-on-write and the device state's descriptor inherited, so taking a slot is: swap the
slot's directory with the clone's (renameat2 RENAME_EXCHANGE: the supervisor and its relays work
relative to their working directory, which follows), `migrate-incoming` and `cont`.

What must be in QEMU's argv cannot differ between slot and clone. NICs are (microvm has no
hotplug, and a virtio-net device needs its netdev at start), so a slot has as many TAPs as its
snapshot's VM had NICs, passed by descriptor (`-netdev tap,fd=N`) and held by the network in a
namespace of the slot's own, where QEMU runs; for a clone taking the slot, that namespace becomes
the clone's first (its TAPs renamed), so only clones with as many interfaces take one. The name (`-name`) and the kernel command line are the slot's
(boot.json records the process name, which re-adoption then looks for). A reset would boot the guest again with the
slot's kernel command line (its vm_id), so a pool-born VM's reboot starts a QEMU of its own
instead: a cold boot of its own disk, as after a shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from metald.backends.qemu.cmdline import name_matches
from metald.backends.qemu.control import Qmp, write_boot_state
from metald.backends.vmm.lifecycle import VmmLifecycle
from metald.backends.vmm.process import VmmProcess
from metald.domain.errors import MetaldError
from metald.ports import LaunchSpec, VmRuntime

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@dataclass(frozen=True)
class Launched:
    """A QEMU just started for `spec`, its QMP connected (control.client) but not yet tracked."""

    vmm: VmmProcess
    control: Qmp
    incoming: int | None  # the device state's descriptor in QEMU, for `migrate-incoming fd:N`
    console_offset: int = 0  # where this run's output begins in the console log


@dataclass(eq=False)
class Slot:
    launched: Launched
    monitor: asyncio.Task[None] | None = field(default=None, repr=False)


def own_spec(spec: LaunchSpec) -> LaunchSpec:
    """How a VM born in a slot is started again in a QEMU of its own (its disks as they are)."""
    return dataclasses.replace(spec, restore_from=None, pool_slot=None)


def exchange_dirs(a: Path, b: Path) -> None:
    """Swap two directories atomically (both must exist, on one filesystem); blocking."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), str(a))


def _move_in(slot_dir: Path, vm_dir: Path) -> None:
    """The slot's directory becomes vm_dir; what create made there goes (blocking: one thread hop
    on a pooled clone's clock instead of three)."""
    vm_dir.mkdir(0o750, parents=True, exist_ok=True)
    exchange_dirs(slot_dir, vm_dir)
    shutil.rmtree(slot_dir, ignore_errors=True)  # what create made for the clone


class PoolSlots:
    """The slots this daemon started, by directory. `launch` starts a QEMU for a spec (the
    backend's own launch), `start` a VM; `lifecycle` is the backend's VMM bookkeeping."""

    def __init__(
        self,
        launch: Callable[[LaunchSpec], Awaitable[Launched]],
        start: Callable[[LaunchSpec], Awaitable[VmRuntime]],
        lifecycle: VmmLifecycle[Qmp],
    ) -> None:
        self._launch = launch
        self._start = start
        self._vms = lifecycle
        self._slots: dict[Path, Slot] = {}

    def __len__(self) -> int:
        return len(self._slots)

    async def start(self, spec: LaunchSpec) -> None:
        assert spec.restore_from is not None, "a slot is a clone's QEMU"
        launched = await self._launch(spec)
        launched.control.vmm_name = spec.vm_id
        await asyncio.to_thread(write_boot_state, spec.vm_dir, 0, launched.control)  # for re-adoption
        slot = self._slots[spec.vm_dir] = Slot(launched)
        slot.monitor = asyncio.create_task(self._watch(spec.vm_dir, slot))

    def running(self, slot_dir: Path) -> bool:
        slot = self._slots.get(slot_dir)
        return slot is not None and slot.launched.vmm.running

    async def _watch(self, slot_dir: Path, slot: Slot) -> None:
        """A slot whose QEMU ends by itself is gone: nothing of it is left."""
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(slot.launched.vmm.exited)  # cancelled when taken: the VMM runs on
            if self._slots.get(slot_dir) is slot:
                log.warning("warm pool slot %s: QEMU ended while waiting", slot_dir.name)
                await self.stop(slot_dir)

    async def take(self, spec: LaunchSpec) -> Launched | None:
        """The slot spec.pool_slot, its directory now spec.vm_dir (the clone's own, made at create,
        goes); None if there is no such waiting slot (it is then removed)."""
        assert spec.pool_slot is not None
        slot = self._slots.pop(spec.pool_slot, None)
        if slot is None or not slot.launched.vmm.running:
            await self.stop(spec.pool_slot, slot)
            return None
        if slot.monitor is not None:
            slot.monitor.cancel()
        try:
            await asyncio.to_thread(_move_in, spec.pool_slot, spec.vm_dir)
        except OSError as e:
            log.warning("cannot take warm pool slot %s for %s: %s", spec.pool_slot.name, spec.vm_id, e)
            await self.stop(spec.pool_slot, slot)
            return None
        slot.launched.vmm.vm_dir = spec.vm_dir
        self.mark_pool_born(slot.launched.control, spec)
        return slot.launched

    async def stop(self, slot_dir: Path, slot: Slot | None = None) -> None:
        """Kill the slot's QEMU (ours, or one an earlier daemon left), its cgroup and its files."""
        slot = self._slots.pop(slot_dir, None) or slot
        if slot is not None:
            if slot.monitor is not None and slot.monitor is not asyncio.current_task():
                slot.monitor.cancel()
            await slot.launched.control.close()
            await self._vms.kill_untracked(slot.launched.vmm)
        elif (
            orphan := await VmmProcess.attach(slot_dir, lambda argv: name_matches(argv, slot_dir.name))
        ) is not None:
            await self._vms.kill_untracked(orphan)
        await self._vms.remove_cgroup(slot_dir.name, slot_dir)
        await asyncio.to_thread(shutil.rmtree, slot_dir, True)

    def mark_pool_born(self, control: Qmp, spec: LaunchSpec) -> None:
        """The VM `spec` runs in a slot's QEMU: a reset (ours or the guest's) would boot the slot's
        kernel command line, so it moves the VM to a QEMU of its own, booting its disk."""

        async def restart() -> None:
            if control.vm is None or not control.vm.vmm.running:
                return
            try:
                await self._vms.kill(control.vm)
                await self._start(own_spec(spec))
            except MetaldError as e:
                log.error("vm %s: cannot restart out of its pool slot's QEMU: %s", spec.vm_id, e.message)
                raise

        control.reset_elsewhere = restart

    async def close(self) -> None:
        """At daemon shutdown: slots are not left behind (the next daemon fills its own)."""
        for slot_dir in list(self._slots):
            await self.stop(slot_dir)
