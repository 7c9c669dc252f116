"""VmService: the per-host implementation of metald/usecases.py:VmUseCases, assembled from its
parts by concern (lifecycle and stopping, queries, watch, recovery)."""

from __future__ import annotations

from metald.domain.errors import unimplemented
from metald.guestwork import GuestWork
from metald.service.queries import Queries
from metald.service.recovery import Recovery
from metald.service.watch import Watch
from metald.usecases import ExecCommand, ExecResult, GuestFile


class VmService(Recovery, Queries, Watch):
    # ---- inside the guest (metald/guestwork.py; None where the backend has no agent channel) ----

    def _guest(self, rpc: str) -> GuestWork:
        if self._guest_work is None:
            raise unimplemented(rpc)
        return self._guest_work

    async def exec(self, customer_id: str, vm_id: str, command: ExecCommand) -> ExecResult:
        return await self._guest("ExecVm").exec(customer_id, vm_id, command)

    async def write_file(self, customer_id: str, vm_id: str, path: str, content: bytes, mode: int) -> None:
        await self._guest("WriteFile").write_file(customer_id, vm_id, path, content, mode)

    async def read_file(self, customer_id: str, vm_id: str, path: str) -> GuestFile:
        return await self._guest("ReadFile").read_file(customer_id, vm_id, path)
