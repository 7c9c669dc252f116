"""The part of the Backend port (metald/ports.py) that every VMM backend answers from its
VmmLifecycle alone; a backend adds its launch, its control channel and what it reads through it."""

from __future__ import annotations

import abc
from typing import Generic

from metald.backends.vmm.lifecycle import C, RunningVm, VmmLifecycle
from metald.ports import ExitListener, VmRuntime


class VmmBackend(abc.ABC, Generic[C]):
    _vms: VmmLifecycle[C]

    def set_exit_listener(self, listener: ExitListener) -> None:
        self._vms.set_exit_listener(listener)

    async def wait_ready(self, vm_id: str, timeout: float) -> bool:
        return await self._vms.wait_ready(vm_id, timeout)

    async def runtime(self, vm_id: str) -> VmRuntime | None:
        vm = self._vms.find(vm_id)
        return None if vm is None else await self._runtime(vm)

    def last_exit_reason(self, vm_id: str) -> str | None:
        return self._vms.last_exit_reason(vm_id)

    @abc.abstractmethod
    async def _runtime(self, vm: RunningVm[C]) -> VmRuntime:
        """What is true of this running VMM now (pid, socket, readiness, pause, backend details)."""
