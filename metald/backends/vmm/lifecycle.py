"""The lifecycle bookkeeping every VMM backend shares: which VMs run, how each last ended, who is
told of an end nobody asked for, waiting for the ready line or for the end, re-adoption after a
daemon restart, orphan cleanup, cgroups, /proc metrics and detaching at daemon shutdown.

A backend adds only its control channel (QMP, Firecracker's REST API: anything with `close()`,
carrying whatever per-VM facts the backend needs) and its launch description (how to spawn the VMM
and recognise it by its command line). See docs/architecture.md, "add a backend".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from metald.backends import procfs
from metald.backends.vmm.cgroups import VMM_MEMORY_OVERHEAD, Cgroups, cgroup_name, vmm_limits
from metald.backends.vmm.console import ReadyWatch
from metald.backends.vmm.layout import STATE_FILES
from metald.backends.vmm.process import CmdlineMatcher, VmmProcess, exit_reason, read_exit, remove_cgroup
from metald.domain.errors import MetaldError, internal, precondition, vm_exited
from metald.ports import ExitListener, LaunchSpec

log = logging.getLogger(__name__)

KILL_TIMEOUT = 10.0
READY_POLL_INTERVAL = 0.05
GONE_WHILE_DOWN = "vmm_gone_while_daemon_down"  # no exit.json: the host rebooted, or files were removed


class Control(Protocol):
    """A VMM's control channel, closed once the VMM has ended or the daemon detaches."""

    async def close(self) -> None: ...


C = TypeVar("C", bound=Control)


@dataclass(eq=False)
class RunningVm(Generic[C]):
    """A VMM this backend started or re-adopted, until it ends or the backend closes."""

    vm_id: str
    vm_dir: Path
    vmm: VmmProcess
    control: C
    watch: ReadyWatch
    paused: bool = False
    guest_poweroff: bool | None = None  # what the control channel learnt of an end (None: unknown)
    stopping: bool = False  # an end we asked for: the exit listener is not told
    monitor: asyncio.Task[None] | None = field(default=None, repr=False)


def vmm_failed(vm_id: str, message: str, reason: str = "VMM_FAILED") -> MetaldError:
    return internal(reason, f"VM {vm_id}: {message}", vm_id=vm_id)


def remove_files(vm_dir: Path, names: Sequence[str]) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            (vm_dir / name).unlink()


class VmmLifecycle(Generic[C]):
    """The registry of running VMs of one backend and everything around their ends.

    `runtime_files`: names in vm_dir that belong to one run of the VMM (sockets; the supervisor's
    state files are always among them), removed once it has ended. `cgroups`: where VMMs get their
    own cgroup with the limits of vmm/cgroups.py (None: no limits).
    """

    def __init__(
        self,
        vmm_name: str,
        *,
        runtime_files: Sequence[str] = (),
        cgroups: Cgroups | None = None,
        memory_overhead: int = VMM_MEMORY_OVERHEAD,
    ) -> None:
        self.vmm_name = vmm_name
        self._runtime_files = (*runtime_files, *STATE_FILES)
        self._cgroups = cgroups
        self._memory_overhead = memory_overhead
        self._vms: dict[str, RunningVm[C]] = {}
        self._last_exit: dict[str, str] = {}
        self._listener: ExitListener | None = None

    def set_exit_listener(self, listener: ExitListener) -> None:
        self._listener = listener

    def __len__(self) -> int:
        return len(self._vms)

    # ---- the registry -------------------------------------------------------------------------

    def find(self, vm_id: str) -> RunningVm[C] | None:
        """The VM if its VMM really runs."""
        vm = self._vms.get(vm_id)
        return vm if vm is not None and vm.vmm.running else None

    def get(self, vm_id: str) -> RunningVm[C]:
        vm = self.find(vm_id)
        if vm is None:
            raise precondition("VMM_NOT_RUNNING", f"VM {vm_id} has no running VMM", vm_id=vm_id)
        return vm

    def track(self, vm_id: str, vm_dir: Path, vmm: VmmProcess, control: C, watch: ReadyWatch) -> RunningVm[C]:
        self._last_exit.pop(vm_id, None)
        vm = RunningVm(vm_id, vm_dir, vmm, control, watch)
        vm.monitor = asyncio.create_task(self._monitor(vm))
        self._vms[vm_id] = vm
        return vm

    async def supersede(self, vm_id: str) -> None:
        """Before a new start: a VMM that ended but whose end is not yet handled is over for good."""
        vm = self._vms.get(vm_id)
        if vm is not None and not vm.vmm.running:
            vm.stopping = True
            await self.ended(vm, KILL_TIMEOUT)

    async def _monitor(self, vm: RunningVm[C]) -> None:
        """Runs until the VMM ends: cleans up, and tells the listener if nobody asked for the end."""
        try:
            info = await vm.vmm.exited
        except asyncio.CancelledError:
            return  # detached (daemon shutdown): the VM runs on
        await vm.control.close()
        await asyncio.to_thread(remove_files, vm.vm_dir, self._runtime_files)
        if self._vms.get(vm.vm_id) is vm:
            del self._vms[vm.vm_id]
        if vm.stopping:
            return
        reason = exit_reason(info, guest_poweroff=vm.guest_poweroff)
        self._last_exit[vm.vm_id] = reason
        log.info("vm %s: %s exited (%s) without a stop request: %s", vm.vm_id, self.vmm_name, info, reason)
        if self._listener is not None:
            try:
                await self._listener(vm.vm_id, reason)
            except Exception:
                log.exception("vm %s: exit listener failed", vm.vm_id)

    # ---- waiting ------------------------------------------------------------------------------

    async def wait_ready(self, vm_id: str, timeout: float) -> bool:
        """True once the current boot's ready line appears; False at the timeout. A VMM that ends
        first is an error (VM_EXITED, with how it ended), not a wait until the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            vm = self._vms.get(vm_id)  # looked up each time: a reboot may replace it
            if vm is None:
                raise self._exited(vm_id)
            if await vm.watch.poll():
                return True
            if not vm.vmm.running:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(vm.monitor), KILL_TIMEOUT)  # type: ignore[arg-type]
                if self._vms.get(vm_id) is not vm:
                    continue  # handled (or replaced by a new start): look again
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(READY_POLL_INTERVAL)

    def _exited(self, vm_id: str) -> MetaldError:
        reason = self._last_exit.get(vm_id, "stopped")
        return vm_exited(vm_id, reason)

    @staticmethod
    async def ended(vm: RunningVm[C], timeout: float) -> bool:
        """Wait up to `timeout` for the VMM to end and be cleaned up."""
        assert vm.monitor is not None
        try:
            await asyncio.wait_for(asyncio.shield(vm.monitor), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, vm_id: str, politely: Callable[[RunningVm[C]], Awaitable[str | None]] | None) -> str:
        """Stop the VM's VMM: `politely` (the backend's graceful way; how it ended, or None if it did
        not), then SIGKILL. "not_running" if there is none: a stop of what is gone is success."""
        vm = self._vms.get(vm_id)
        if vm is None:
            return "not_running"
        vm.stopping = True
        if not vm.vmm.running:  # ended by itself just now, not yet handled: say how
            await self.ended(vm, KILL_TIMEOUT)
            if vm.vmm.exited.cancelled():
                return "not_running"
            return exit_reason(vm.vmm.exited.result(), guest_poweroff=vm.guest_poweroff)
        if politely is not None and (how := await politely(vm)) is not None:
            return how
        if vm.vmm.running:
            await self.kill(vm)
        else:
            await self.ended(vm, KILL_TIMEOUT)
        return "killed"

    async def kill(self, vm: RunningVm[C]) -> None:
        """SIGKILL the VMM and wait until its end is handled."""
        vm.stopping = True
        vm.vmm.kill()
        if not await self.ended(vm, KILL_TIMEOUT):
            raise vmm_failed(vm.vm_id, f"{self.vmm_name} pid {vm.vmm.pid} survived SIGKILL", "VMM_STUCK")

    async def kill_untracked(self, vmm: VmmProcess) -> None:
        """A VMM that is not (or no longer) tracked: kill it, wait for its end, forget it."""
        vmm.kill()
        await asyncio.wait({vmm.exited}, timeout=KILL_TIMEOUT)
        vmm.detach()
        await asyncio.to_thread(remove_files, vmm.vm_dir, self._runtime_files)

    # ---- after a daemon restart, and at delete ----------------------------------------------

    async def attach(self, spec: LaunchSpec, matches: CmdlineMatcher) -> VmmProcess | None:
        """The VM's VMM left by an earlier daemon if it still runs; else None, remembering why it ended
        (exit.json; if that is gone too, the host rebooted or someone removed the VM's files) and
        removing what its run left (sockets, state files, its cgroup)."""
        vmm = await VmmProcess.attach(spec.vm_dir, matches)
        if vmm is not None:
            return vmm
        info = await asyncio.to_thread(read_exit, spec.vm_dir)
        self._last_exit[spec.vm_id] = GONE_WHILE_DOWN if info is None else exit_reason(info)
        await asyncio.to_thread(remove_files, spec.vm_dir, self._runtime_files)
        await self.remove_cgroup(spec.vm_id, spec.vm_dir)
        return None

    async def kill_orphan(self, vm_id: str, vm_dir: Path, matches: CmdlineMatcher) -> None:
        """At destroy: the VM's VMM (tracked, or left running by an earlier daemon) is killed, its
        cgroup removed and its last exit forgotten. Anything already gone is success."""
        if (vm := self._vms.get(vm_id)) is not None:
            await self.kill(vm)
        elif (orphan := await VmmProcess.attach(vm_dir, matches)) is not None:
            await self.kill_untracked(orphan)
        await self.remove_cgroup(vm_id, vm_dir)
        self._last_exit.pop(vm_id, None)

    def last_exit_reason(self, vm_id: str) -> str | None:
        return self._last_exit.get(vm_id)

    def forget_exit(self, vm_id: str) -> None:
        self._last_exit.pop(vm_id, None)

    # ---- cgroups ------------------------------------------------------------------------------

    async def create_cgroup(self, spec: LaunchSpec) -> list[Path]:
        """The VM's cgroup with its limits (none without a cgroup hierarchy)."""
        if self._cgroups is None:
            return []
        limits = vmm_limits(spec.vcpu_count, spec.memory_bytes, self._memory_overhead)
        try:
            return await asyncio.to_thread(self._cgroups.create, cgroup_name(spec.vm_id, spec.vm_dir), limits)
        except OSError as e:
            raise vmm_failed(spec.vm_id, f"cannot create its cgroup {e.filename}: {e.strerror}") from e

    async def remove_cgroup(self, vm_id: str, vm_dir: Path) -> None:
        """The VM's cgroup, if a crash left it (its supervisor removes it when the VMM ends)."""
        if self._cgroups is not None:
            await remove_cgroup(self._cgroups.dirs(cgroup_name(vm_id, vm_dir)))

    # ---- observing and detaching ------------------------------------------------------------

    @staticmethod
    def process_usage(vm: RunningVm[C]) -> tuple[int, int]:
        """(CPU time in ns, resident memory in bytes) of the VMM process."""
        stat = procfs.read_stat(vm.vmm.pid)
        return (stat.cpu_time_nanos if stat else 0), procfs.read_rss_bytes(vm.vmm.pid)

    async def close(self) -> None:
        """Detach from every VMM, leaving them running for the next daemon to adopt."""
        for vm in list(self._vms.values()):
            if vm.monitor is not None:
                vm.monitor.cancel()
            vm.vmm.detach()
            await vm.control.close()
        self._vms.clear()
