"""What every part of the service shares: its ports, per-VM locks, ownership and backend calls."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from metald.assets import AssetResolver
from metald.domain import ids
from metald.domain.errors import ErrorCode, MetaldError, invalid, not_found, not_owned
from metald.domain.model import Vm
from metald.domain.paging import PageTokens
from metald.domain.pending import PendingOp
from metald.domain.quotas import Quotas
from metald.domain.validation import Defaults, Limits
from metald.ports import Backend, EventLog, Network, ServiceEvents, SnapshotRecords, VmRecords
from metald.service.transitions import Transitions

if TYPE_CHECKING:
    from metald.guestwork import GuestWork

log = logging.getLogger("metald.service")
T = TypeVar("T")

MIN_FREE_DISK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class ServiceOptions:
    vms_dir: Path
    limits: Limits
    defaults: Defaults
    quotas: Quotas
    shutdown_timeout: float
    boot_wait_timeout: float
    # Where snapshots keep their files (None: this host takes none), and their per-customer limits.
    snapshots_dir: Path | None = None
    max_snapshots_per_customer: int = 0  # 0: unlimited
    max_snapshot_bytes_per_customer: int = 0
    max_warm_pool_size: int = 0
    pool_dir: Path | None = None  # warm pool slots' directories (same filesystem as vms_dir); None: no pools


class ServiceBase:
    def __init__(
        self,
        *,
        store: VmRecords,
        event_log: EventLog,
        backend: Backend,
        network: Network | None,
        assets: AssetResolver,
        page_tokens: PageTokens,
        events: ServiceEvents,
        options: ServiceOptions,
        snapshots: SnapshotRecords | None = None,
        guest_work: GuestWork | None = None,
    ) -> None:
        self._guest_work = guest_work
        self._vms = store
        self._snapshots = snapshots
        self._event_log = event_log
        self._backend = backend
        self._network = network
        self._assets = assets
        self._tokens = page_tokens
        self._events = events
        self._opts = options
        self._records = Transitions(store)
        self._locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._create_lock = asyncio.Lock()  # id check, quota and insert of CreateVm, as one
        self._boot_lock = asyncio.Lock()  # capacity check of BootVm and the boots in flight
        self._booting: dict[str, Vm] = {}
        self._graceful: dict[str, asyncio.Event] = {}  # set by a forced stop to cut a graceful one short
        backend.set_exit_listener(self._on_vmm_exit)

    async def _on_vmm_exit(self, vm_id: str, reason: str) -> None:
        """A VMM ended by itself (metald/service/lifecycle.py)."""
        raise NotImplementedError

    @property
    def backend_type(self) -> str:
        return self._backend.capabilities.backend_type

    @contextlib.asynccontextmanager
    async def _vm_lock(self, vm_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(vm_id, asyncio.Lock())
        async with lock:
            yield

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _owned(self, customer_id: str, vm_id: str) -> Vm:
        if not ids.VM_ID_PATTERN.fullmatch(vm_id):
            raise invalid("vm_id", "must match [A-Za-z0-9_-]{1,64}")
        vm = await self._vms.get(vm_id)
        if vm is None or vm.pending == PendingOp.CREATING:  # half-created: not there yet (or ever)
            raise not_found(vm_id)
        if vm.customer_id != customer_id:
            raise not_owned(vm_id, customer_id)
        return vm

    def _vm_dir(self, vm_id: str) -> Path:
        return self._opts.vms_dir / vm_id

    def _networked(self, vm: Vm) -> Network | None:
        """The network port if this VM has interfaces (and networking is on)."""
        return self._network if vm.config.network else None

    async def _backend_call(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        started = time.monotonic()
        try:
            result = await call()
        except MetaldError as exc:
            self._events.backend_error(self.backend_type, operation)
            if exc.code is ErrorCode.INTERNAL and await self._disk_nearly_full():
                raise disk_full(operation, exc.message) from exc
            raise
        except OSError as exc:
            self._events.backend_error(self.backend_type, operation)
            if exc.errno == errno.ENOSPC or await self._disk_nearly_full():
                raise disk_full(operation, str(exc)) from exc
            log.exception("backend %s failed", operation)
            raise backend_failure(operation, exc) from exc
        except Exception as exc:
            self._events.backend_error(self.backend_type, operation)
            log.exception("backend %s failed", operation)
            raise backend_failure(operation, exc) from exc
        self._events.backend_operation(self.backend_type, operation, time.monotonic() - started)
        return result

    async def _require_disk_room(self) -> None:
        """Refuse a state change before any side effect when its record might not fit on disk
        (DeleteVm is never refused: it frees space)."""
        if await self._disk_nearly_full():
            raise MetaldError(
                ErrorCode.RESOURCE_EXHAUSTED,
                "the disk of the state store is (nearly) full; nothing was changed (delete VMs or free space)",
                reason="STORE_FULL",
            )

    async def _disk_nearly_full(self) -> bool:
        """Whether a backend failure is best explained by the host's disk (VMs need room for logs,
        overlays and sockets)."""
        return await asyncio.to_thread(_free_bytes, self._opts.vms_dir) < MIN_FREE_DISK_BYTES

    async def _detach_tolerant(self, vm: Vm, why: str) -> None:
        """Tear the VM's network down; a failure is logged, never blocks the caller's state change
        (what is left over is an orphan, removed at the next start)."""
        network = self._networked(vm)
        if network is None:
            return
        try:
            await network.detach(vm)
        except Exception as exc:
            log.warning(
                "network teardown of %s failed during %s (left for the orphan sweep): %s",
                vm.vm_id,
                why,
                exc,
                extra={"vm_id": vm.vm_id},
            )


def unimplemented(rpc: str) -> MetaldError:
    return MetaldError(
        ErrorCode.UNIMPLEMENTED, f"{rpc} is not available on this host yet", reason="UNIMPLEMENTED"
    )


def backend_failure(operation: str, exc: Exception) -> MetaldError:
    return MetaldError(
        ErrorCode.INTERNAL,
        f"backend failure during {operation}: {exc}",
        reason="BACKEND_FAILURE",
        metadata={"operation": operation},
    )


def disk_full(operation: str, detail: str) -> MetaldError:
    return MetaldError(
        ErrorCode.RESOURCE_EXHAUSTED,
        f"the host's disk is (nearly) full during {operation}: {detail}",
        reason="DISK_FULL",
        metadata={"operation": operation},
    )


def _free_bytes(path: Path) -> int:
    """Free space of the filesystem that holds (or will hold) `path`."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
