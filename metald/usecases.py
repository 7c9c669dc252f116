"""The use cases every API adapter drives (Connect handlers, REST, the CLI, a fleet gateway).

Adapters depend on this Protocol, never on a concrete service: the per-host `VmService` implements
it, and so can anything that forwards to one (a fleet gateway).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from metald.domain.model import Vm, VmConfig
from metald.domain.states import VmState
from metald.ports import NetworkAttachment, VmMetrics, VmRuntime


@dataclass(frozen=True)
class VmDetails:
    vm: Vm
    backend_type: str
    runtime: VmRuntime | None
    metrics: VmMetrics
    network: NetworkAttachment | None


@dataclass(frozen=True)
class Page:
    vms: list[Vm]
    next_page_token: str
    total_count: int


@dataclass(frozen=True)
class ConsoleChunk:
    data: bytes
    next_offset: int
    size: int


class VmUseCases(Protocol):
    """One method per use case; `customer_id` is the authenticated caller. Errors are MetaldError."""

    async def create(self, customer_id: str, vm_id: str, config: VmConfig, claimed_customer: str) -> Vm: ...

    async def boot(
        self, customer_id: str, vm_id: str, *, wait_for_ready: bool, wait_timeout: float
    ) -> Vm: ...

    async def pause(self, customer_id: str, vm_id: str) -> Vm: ...

    async def resume(self, customer_id: str, vm_id: str) -> Vm: ...

    async def reboot(self, customer_id: str, vm_id: str, *, force: bool) -> Vm: ...

    async def shutdown(self, customer_id: str, vm_id: str, *, force: bool, timeout_seconds: float) -> Vm: ...

    async def delete(self, customer_id: str, vm_id: str, *, force: bool) -> None: ...

    async def info(self, customer_id: str, vm_id: str) -> VmDetails: ...

    async def list(
        self, customer_id: str, states: Sequence[VmState], page_size: int, page_token: str
    ) -> Page: ...

    async def read_console(self, customer_id: str, vm_id: str, offset: int, limit: int) -> ConsoleChunk:
        """Up to `limit` bytes of the VM's console log from `offset` (owner only)."""
        ...
