"""A Backend (metald/ports.py) whose VMMs are records in memory.

It keeps the port's promises: `stop` and `destroy` are idempotent, `adopt` finds a VMM that "kept
running" while a service was replaced (the same FakeBackend given to a new service), the exit
listener is called when a VMM ends by itself (`crash`, a guest that powers off at once), and
`wait_ready` raises FAILED_PRECONDITION (reason VM_EXITED) when the VMM is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from metald.domain.errors import precondition, vm_exited
from metald.ports import (
    BackendCapabilities,
    CheckResult,
    ExitListener,
    LaunchSpec,
    SnapshotResult,
    VmMetrics,
    VmRuntime,
)
from metald.testing.faults import Faults


@dataclass
class FakeVmm:
    spec: LaunchSpec
    pid: int
    paused: bool = False
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    boots: int = 1
    pool_slot: str = ""  # the warm pool slot it was started in


class FakeBackend:
    def __init__(self, *, max_vcpus: int = 32, warm_pool: bool = False) -> None:
        self.capabilities = BackendCapabilities(
            backend_type="fake",
            cpu_templates={"host": "host"},
            console_types=frozenset({"SERIAL", "VIRTIO_CONSOLE"}),
            max_vcpus=max_vcpus,
            supports_snapshots=True,
            supports_warm_pool=warm_pool,
        )
        self.pool_slots: dict[Path, LaunchSpec] = {}  # waiting slots (WarmPoolBackend)
        self.faults = Faults()
        self.vmms: dict[str, FakeVmm] = {}
        self.prepared: set[str] = set()
        self.exits: dict[str, str] = {}
        # Guest behaviour for the next starts: "ready" (reports ready at once), "silent" (never),
        # "poweroff" (the guest powers off right away), "ignore_acpi" (ready, ignores graceful stops).
        self.guest = "ready"
        # False: wait_ready answers False when the VMM is gone (instead of raising VM_EXITED).
        self.exit_is_an_error = True
        self._ignoring_acpi: set[str] = set()
        self._listener: ExitListener | None = None
        self._pids = itertools.count(1000)
        self._notices: set[asyncio.Future[None]] = set()

    def set_exit_listener(self, listener: ExitListener) -> None:
        self._listener = listener

    # ---- what a test does to the world ----

    async def crash(self, vm_id: str, reason: str = "vmm_exited") -> None:
        """The VMM ends by itself; the exit listener hears of it (as from a pidfd)."""
        self._end(vm_id, reason)
        if self._listener is not None:
            await self._listener(vm_id, reason)

    def host_reboot(self) -> None:
        """Every VMM is gone and no one was told (the daemon was down)."""
        for vm_id in list(self.vmms):
            self._end(vm_id, "")
        self.exits.clear()

    # ---- the port ----

    async def prepare(self, spec: LaunchSpec) -> None:
        await self.faults.step("prepare")
        spec.vm_dir.mkdir(parents=True, exist_ok=True)
        self.prepared.add(spec.vm_id)

    async def start(self, spec: LaunchSpec) -> VmRuntime:
        await self.faults.step("start")
        if spec.vm_id in self.vmms:
            raise precondition("RUNNING", f"{spec.vm_id} already runs")
        vmm = self.vmms[spec.vm_id] = FakeVmm(spec, next(self._pids))
        if spec.pool_slot is not None and self.pool_slots.pop(spec.pool_slot, None) is not None:
            shutil.rmtree(spec.vm_dir, ignore_errors=True)
            spec.pool_slot.rename(spec.vm_dir)
            vmm.pool_slot = spec.pool_slot.name
        self.exits.pop(spec.vm_id, None)
        if self.guest == "poweroff":
            self._end(spec.vm_id, "guest_poweroff")
            if self._listener is not None:
                task = asyncio.ensure_future(self._listener(spec.vm_id, "guest_poweroff"))
                self._notices.add(task)
                task.add_done_callback(self._notices.discard)
        elif self.guest in ("ready", "ignore_acpi"):
            vmm.ready.set()
        if self.guest == "ignore_acpi":
            self._ignoring_acpi.add(spec.vm_id)
        return self._runtime(vmm)

    async def wait_ready(self, vm_id: str, timeout: float) -> bool:
        await self.faults.step("wait_ready")
        vmm = self.vmms.get(vm_id)
        if vmm is None:
            if not self.exit_is_an_error:
                return False
            raise vm_exited(vm_id, self.exits.get(vm_id, ""))
        ready = asyncio.ensure_future(vmm.ready.wait())
        gone = asyncio.ensure_future(vmm.gone.wait())
        await asyncio.wait({ready, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        gone.cancel()
        if vmm.ready.is_set():
            return True
        if vmm.gone.is_set():
            if not self.exit_is_an_error:
                return False
            raise vm_exited(vm_id, self.exits.get(vm_id, ""))
        return False

    async def pause(self, vm_id: str) -> None:
        await self.faults.step("pause")
        self._running(vm_id).paused = True

    async def resume(self, vm_id: str) -> None:
        await self.faults.step("resume")
        self._running(vm_id).paused = False

    async def reboot(self, vm_id: str, *, force: bool) -> None:
        await self.faults.step("reboot")
        self._running(vm_id).boots += 1

    async def stop(self, vm_id: str, *, graceful: bool, timeout: float) -> str:
        await self.faults.step("stop")
        vmm = self.vmms.get(vm_id)
        if vmm is None:
            return "not_running"
        if graceful and vm_id in self._ignoring_acpi:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(vmm.gone.wait(), timeout)
            if vm_id not in self.vmms:
                return self.exits.get(vm_id, "killed")
            self._end(vm_id, "killed")
            return "killed"
        reason = "guest_poweroff" if graceful else "killed"
        self._end(vm_id, reason)
        return reason

    async def destroy(self, vm_id: str, vm_dir: Path) -> None:
        await self.faults.step("destroy")
        self._end(vm_id, "killed")
        shutil.rmtree(vm_dir, ignore_errors=True)
        self.prepared.discard(vm_id)

    async def adopt(self, spec: LaunchSpec) -> VmRuntime | None:
        await self.faults.step("adopt")
        vmm = self.vmms.get(spec.vm_id)
        return self._runtime(vmm) if vmm is not None else None

    async def snapshot(self, vm_id: str, dest: Path) -> SnapshotResult:
        """Writes a snapshot directory naming its source (the VMM must run); the VM stays as it was."""
        vmm = self._running(vm_id)
        await asyncio.to_thread(_write_snapshot, dest, vm_id)
        await self.faults.step("snapshot")
        return SnapshotResult(size_bytes=4096, paused_seconds=0.001 if not vmm.paused else 0.0)

    async def start_pool_slot(self, spec: LaunchSpec) -> None:
        await self.faults.step("start_pool_slot")
        spec.vm_dir.mkdir(parents=True)
        self.pool_slots[spec.vm_dir] = spec

    def pool_slot_running(self, slot_dir: Path) -> bool:
        return slot_dir in self.pool_slots

    async def stop_pool_slot(self, slot_dir: Path) -> None:
        self.pool_slots.pop(slot_dir, None)
        shutil.rmtree(slot_dir, ignore_errors=True)

    async def runtime(self, vm_id: str) -> VmRuntime | None:
        await self.faults.step("runtime")
        vmm = self.vmms.get(vm_id)
        return self._runtime(vmm) if vmm is not None else None

    def last_exit_reason(self, vm_id: str) -> str | None:
        return self.exits.get(vm_id) or None

    async def metrics(self, vm_id: str) -> VmMetrics:
        await self.faults.step("metrics")
        vmm = self._running(vm_id)
        return VmMetrics(cpu_time_nanos=1_000_000 * vmm.boots, memory_usage_bytes=vmm.spec.memory_bytes)

    async def ping(self) -> CheckResult:
        return CheckResult("healthy", "fake backend")

    async def close(self) -> None:
        """Detach without stopping: the VMMs "keep running" for the next service."""

    # ---- internals ----

    def _running(self, vm_id: str) -> FakeVmm:
        vmm = self.vmms.get(vm_id)
        if vmm is None:
            raise precondition("NOT_RUNNING", f"VM {vm_id} is not running")
        return vmm

    def _end(self, vm_id: str, reason: str) -> None:
        vmm = self.vmms.pop(vm_id, None)
        self._ignoring_acpi.discard(vm_id)
        if vmm is not None:
            vmm.gone.set()
            if reason:
                self.exits[vm_id] = reason

    @staticmethod
    def _runtime(vmm: FakeVmm) -> VmRuntime:
        extra = {"warm_pool_slot": vmm.pool_slot} if vmm.pool_slot else {}
        return VmRuntime(vmm.pid, f"/fake/{vmm.spec.vm_id}.sock", vmm.ready.is_set(), vmm.paused, extra)


def _write_snapshot(dest: Path, vm_id: str) -> None:
    dest.mkdir()
    (dest / "source").write_text(vm_id)
