"""The use cases every API adapter drives (Connect handlers, REST, the CLI, a fleet gateway).

Adapters depend on this Protocol, never on a concrete service: the per-host `VmService` implements
it, and so can anything that forwards to one (a fleet gateway).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from metald.domain.events import VmEvent
from metald.domain.model import Vm, VmConfig
from metald.domain.snapshots import Snapshot
from metald.domain.states import VmState
from metald.ports import NetworkAttachment, VmMetrics, VmRuntime


@dataclass(frozen=True)
class VmDetails:
    vm: Vm
    backend_type: str
    runtime: VmRuntime | None
    metrics: VmMetrics
    network: NetworkAttachment | None
    # More backend_info entries: a fleet gateway passes on the host's and adds the host id.
    backend_info: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Page:
    vms: list[Vm]
    next_page_token: str
    total_count: int


@dataclass(frozen=True)
class SnapshotPage:
    snapshots: list[Snapshot]
    next_page_token: str
    total_count: int


@dataclass(frozen=True)
class SnapshotTaken:
    snapshot: Snapshot
    vm_state: VmState  # the source VM's state afterwards: the state it was in


@dataclass(frozen=True)
class ConsoleChunk:
    data: bytes
    next_offset: int
    size: int


@dataclass(frozen=True)
class WatchItem:
    """One event of a watch and the opaque cursor to resume after it."""

    cursor: str
    event: VmEvent


@dataclass(frozen=True)
class ExecCommand:
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    stdin: bytes = b""
    working_dir: str = ""
    timeout_seconds: float = 0.0  # 0: the host's default


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    truncated: bool = False


@dataclass(frozen=True)
class GuestFile:
    content: bytes
    mode: int
    size_bytes: int


class VmUseCases(Protocol):
    """One method per use case; `customer_id` is the authenticated caller. Errors are MetaldError."""

    async def create(
        self, customer_id: str, vm_id: str, config: VmConfig, claimed_customer: str, snapshot_id: str = ""
    ) -> Vm:
        """A new VM; with `snapshot_id`, a clone of that snapshot (its first boot restores it)."""
        ...

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

    def watch(
        self, customer_id: str, states: Sequence[VmState], vm_ids: Sequence[str], after_cursor: str
    ) -> AsyncIterator[WatchItem]:
        """The caller's VM events after `after_cursor` (kept ones first), then live ones, until the
        caller stops iterating. A cursor older than the retention raises OUT_OF_RANGE."""
        ...

    async def exec(self, customer_id: str, vm_id: str, command: ExecCommand) -> ExecResult: ...

    async def write_file(
        self, customer_id: str, vm_id: str, path: str, content: bytes, mode: int
    ) -> None: ...

    async def read_file(self, customer_id: str, vm_id: str, path: str) -> GuestFile: ...

    async def snapshot(
        self, customer_id: str, vm_id: str, snapshot_id: str, metadata: dict[str, str], warm_pool_size: int
    ) -> SnapshotTaken: ...

    async def list_snapshots(self, customer_id: str, page_size: int, page_token: str) -> SnapshotPage: ...

    async def delete_snapshot(self, customer_id: str, snapshot_id: str) -> None: ...
