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
from metald.domain.errors import (
    ErrorCode,
    MetaldError,
    disk_full,
    exhausted,
    internal,
)
from metald.domain.model import Vm
from metald.domain.ownership import owned_vm
from metald.domain.paging import PageTokens
from metald.domain.quotas import Quotas
from metald.domain.validation import Defaults, Limits
from metald.ports import Backend, EventLog, Network, ServiceEvents, SnapshotRecords, VmRecords
from metald.service.transitions import Transitions

if TYPE_CHECKING:
    from metald.guestwork import GuestWork
    from metald.service.event_tail import CustomerTail

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


@dataclass(frozen=True)
class ServicePorts:
    """What one host's service is built from: the daemon wires the real ports, tests fakes."""

    store: VmRecords
    event_log: EventLog
    backend: Backend
    network: Network | None
    assets: AssetResolver
    page_tokens: PageTokens
    events: ServiceEvents
    options: ServiceOptions
    snapshots: SnapshotRecords | None = None  # None: no snapshot records (snapshots off)
    guest_work: GuestWork | None = None  # None: the backend has no agent channel


class ServiceBase:
    def __init__(self, *, ports: ServicePorts) -> None:
        self._guest_work = ports.guest_work
        self._vms = ports.store
        self._snapshots = ports.snapshots
        self._event_log = ports.event_log
        self._backend = ports.backend
        self._network = ports.network
        self._assets = ports.assets
        self._tokens = ports.page_tokens
        self._events = ports.events
        self._opts = ports.options
        self._records = Transitions(ports.store)
        self._locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._create_lock = asyncio.Lock()  # id check, quota and insert of CreateVm, as one
        self._boot_lock = asyncio.Lock()  # capacity check of BootVm and the boots in flight
        self._booting: dict[str, Vm] = {}
        self._tails: dict[str, CustomerTail] = {}  # the watches' shared event tails, per customer
        self._graceful: dict[str, asyncio.Event] = {}  # set by a forced stop to cut a graceful one short
        ports.backend.set_exit_listener(self._on_vmm_exit)

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
        return owned_vm(await self._vms.get(ids.check_vm_id(vm_id)), vm_id, customer_id)

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
                raise _disk_full_during(operation, exc.message) from exc
            raise
        except OSError as exc:
            self._events.backend_error(self.backend_type, operation)
            if exc.errno == errno.ENOSPC or await self._disk_nearly_full():
                raise _disk_full_during(operation, str(exc)) from exc
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
            raise exhausted(
                "STORE_FULL",
                "the disk of the state store is (nearly) full; nothing was changed (delete VMs or free space)",
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


def backend_failure(operation: str, exc: Exception) -> MetaldError:
    return internal("BACKEND_FAILURE", f"backend failure during {operation}: {exc}", operation=operation)


def _disk_full_during(operation: str, detail: str) -> MetaldError:
    return disk_full(f"the host's disk is (nearly) full during {operation}: {detail}", operation=operation)


def _free_bytes(path: Path) -> int:
    """Free space of the filesystem that holds (or will hold) `path`."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
