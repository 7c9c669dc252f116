"""A QEMU VM's control channel (QMP) and what the backend records of its current boot (boot.json)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from metald.backends.qemu import layout
from metald.backends.qemu.qmp import QmpClient, QmpClosedError, QmpError
from metald.backends.vmm.jsonfile import write_json_atomic
from metald.backends.vmm.lifecycle import RunningVm, vmm_failed


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
    client: QmpClient | None = None
    vm: RunningVm[Qmp] | None = field(default=None, repr=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    def on_event(self, event: dict[str, Any]) -> None:
        if self.vm is None:
            return
        if event.get("event") == "SHUTDOWN":
            self.vm.guest_poweroff = bool(event.get("data", {}).get("guest"))
        elif event.get("event") == "RESET":
            self.restored_ready = False
            self.vm.watch.restart()
            task = asyncio.create_task(save_boot_state(self.vm))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0
    ) -> Any:
        assert self.client is not None and self.vm is not None
        try:
            return await self.client.execute(command, arguments, timeout=timeout)
        except (QmpError, QmpClosedError, TimeoutError) as e:
            raise vmm_failed(self.vm.vm_id, f"QMP {command} failed: {e}") from e

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


def write_boot_state(vm: RunningVm[Qmp]) -> None:
    control = vm.control
    data = {
        "console_offset": vm.watch.offset,
        "accel": control.accel,
        "cpu_model": control.cpu_model,
        "ram_fd": control.ram_fd,
        "restored_ready": control.restored_ready,
    }
    write_json_atomic(vm.vm_dir / layout.BOOT_STATE, data)


async def save_boot_state(vm: RunningVm[Qmp]) -> None:
    """After a reset: record where the new boot's console output begins (poll() finds it)."""
    await vm.watch.poll()
    with contextlib.suppress(OSError):
        await asyncio.to_thread(write_boot_state, vm)
