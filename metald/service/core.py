"""VmService: the per-host implementation of metald/usecases.py:VmUseCases, assembled from its
parts by concern (lifecycle and stopping, queries, watch, recovery)."""

from __future__ import annotations

from metald.service.base import unimplemented
from metald.service.queries import Queries
from metald.service.recovery import Recovery
from metald.service.watch import Watch
from metald.usecases import ExecCommand, ExecResult, GuestFile


class VmService(Recovery, Queries, Watch):
    # ---- not built yet (issue 15, guest agent): answered UNIMPLEMENTED until they are ----------

    async def exec(self, customer_id: str, vm_id: str, command: ExecCommand) -> ExecResult:
        raise unimplemented("ExecVm")

    async def write_file(self, customer_id: str, vm_id: str, path: str, content: bytes, mode: int) -> None:
        raise unimplemented("WriteFile")

    async def read_file(self, customer_id: str, vm_id: str, path: str) -> GuestFile:
        raise unimplemented("ReadFile")
