"""A QEMU VM's control channel (QMP) and what the backend records of its current boot (boot.json)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metald.backends.qemu import layout
from metald.backends.qemu.qmp import QmpClient, QmpClosedError, QmpError
from metald.backends.vmm.jsonfile import read_json, write_json_atomic
from metald.backends.vmm.lifecycle import RunningVm, vmm_failed
from metald.domain.errors import ErrorCode, MetaldError, kernel_invalid


@dataclass(eq=False)
class Qmp:
    """One VM's QMP connection and what this backend knows of its run (accelerator, CPU model).

    QMP events: SHUTDOWN says whether the guest asked to end (a poweroff) or the host; RESET (a
    guest reboot, a kernel panic with panic=N, our system_reset) starts a new boot, not ready until
    its own ready line."""

    accel: str
    cpu_model: str
    ram_fd: int | None = None  # the RAM file's descriptor in QEMU (a snapshot copies it)
    restored_ready: bool = False  # restored from a snapshot of a guest that was up (no ready line)
    vmm_name: str | None = None  # QEMU's -name when it is not the VM's id (a warm pool slot's)
    # A pool-born VM's reset: it moves to a QEMU of its own (pool.py) instead of resetting here.
    reset_elsewhere: Callable[[], Coroutine[Any, Any, None]] | None = field(default=None, repr=False)
    client: QmpClient | None = None
    vm: RunningVm[Qmp] | None = field(default=None, repr=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    def on_event(self, event: dict[str, Any]) -> None:
        if self.vm is None:
            return
        if event.get("event") == "SHUTDOWN":
            self.vm.guest_poweroff = bool(event.get("data", {}).get("guest"))
        elif event.get("event") == "RESET" and self.reset_elsewhere is not None:
            self._spawn(self.reset_elsewhere())
        elif event.get("event") == "RESET":
            self.restored_ready = False
            self.vm.watch.restart()
            self._spawn(save_boot_state(self.vm))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0
    ) -> Any:
        assert self.client is not None
        with self._failing(command):
            return await self.client.execute(command, arguments, timeout=timeout)

    async def status(self, timeout: float = 10.0) -> str:
        """QEMU's run state (QmpClient.status: no query while it is known to run)."""
        assert self.client is not None
        with self._failing("query-status"):
            return await self.client.status(timeout=timeout)

    @contextlib.contextmanager
    def _failing(self, command: str) -> Iterator[None]:
        """QMP's failures as the VMM's."""
        assert self.vm is not None
        try:
            yield
        except (QmpError, QmpClosedError, TimeoutError) as e:
            raise vmm_failed(self.vm.vm_id, f"QMP {command} failed: {e}") from e

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


def write_boot_state(vm_dir: Path, console_offset: int, control: Qmp) -> None:
    data = {
        "console_offset": console_offset,
        "accel": control.accel,
        "cpu_model": control.cpu_model,
        "ram_fd": control.ram_fd,
        "restored_ready": control.restored_ready,
        "vmm_name": control.vmm_name,
    }
    write_json_atomic(vm_dir / layout.BOOT_STATE, data)


async def awaiting_restore(control: Qmp) -> bool:
    """Whether the QEMU still waits for the device state it was started to load."""
    assert control.client is not None
    with contextlib.suppress(QmpError, QmpClosedError, TimeoutError):
        return await control.client.status() == "inmigrate"
    return False


def recorded_vmm_name(vm_dir: Path) -> str | None:
    """The QEMU -name boot.json records when it is not the VM's id (a warm pool slot's); blocking."""
    name = (read_json(vm_dir / layout.BOOT_STATE) or {}).get("vmm_name")
    return name if isinstance(name, str) else None


async def save_boot_state(vm: RunningVm[Qmp]) -> None:
    """After a reset: record where the new boot's console output begins (poll() finds it)."""
    await vm.watch.poll()
    with contextlib.suppress(OSError):
        await asyncio.to_thread(write_boot_state, vm.vm_dir, vm.watch.offset, vm.control)


# What QEMU says of a kernel image it cannot load (x86 loader, QEMU 7.2).
_KERNEL_REFUSED = (
    "invalid kernel header",
    "could not load kernel",
    "Error loading uncompressed kernel",
    "linux kernel too old",
)


def did_not_come_up(vm_id: str, tail: str) -> MetaldError:
    """The error for a QEMU that ended before its QMP answered; `tail`: the end of its log."""
    if any(marker in tail for marker in _KERNEL_REFUSED):  # the customer's input, not our fault
        field = "config.boot.kernel_path"
        message = f"VM {vm_id}: QEMU cannot boot {field}: {tail}"
        return kernel_invalid(field, message, ErrorCode.FAILED_PRECONDITION, vm_id=vm_id)
    return vmm_failed(vm_id, f"QEMU did not come up: {tail}")
