"""The use cases: create, boot, pause, resume, reboot, shut down, delete, inspect and list VMs.

Each multi-step operation marks the VM `pending` in the store before its first side effect and
clears it after the last, so a daemon killed halfway finishes or undoes it in `recover()`.
Operations on one VM are serialised by a per-VM lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from metald.assets import AssetResolver
from metald.domain import ids
from metald.domain.errors import ErrorCode, MetaldError, invalid, not_found, not_owned
from metald.domain.guest_args import guest_kernel_args
from metald.domain.model import Vm, VmConfig
from metald.domain.paging import PageTokens
from metald.domain.quotas import Quotas, Usage, check_boot, check_create
from metald.domain.states import ACTIVE_STATES, TARGET, Operation, VmState, require_allowed
from metald.domain.validation import Defaults, Limits, validate_config, with_defaults
from metald.guestwork import GuestWork
from metald.ports import (
    Backend,
    DiskSpec,
    LaunchSpec,
    Network,
    NetworkAttachment,
    ServiceEvents,
    StoreFullError,
    VmMetrics,
    VmStore,
)
from metald.usecases import ConsoleChunk, ExecCommand, ExecResult, GuestFile, Page, VmDetails, WatchItem

log = logging.getLogger("metald.service")
T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
UNDO_RETRY_SECONDS = 1.0
MIN_FREE_DISK_BYTES = 8 * 1024 * 1024
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class ServiceOptions:
    vms_dir: Path
    limits: Limits
    defaults: Defaults
    quotas: Quotas
    shutdown_timeout: float
    boot_wait_timeout: float


class VmService:
    def __init__(
        self,
        *,
        store: VmStore,
        backend: Backend,
        network: Network | None,
        assets: AssetResolver,
        page_tokens: PageTokens,
        events: ServiceEvents,
        options: ServiceOptions,
        guest_work: GuestWork | None = None,
    ) -> None:
        self._guest_work = guest_work
        self._store = store
        self._backend = backend
        self._network = network
        self._assets = assets
        self._tokens = page_tokens
        self._events = events
        self._opts = options
        self._locks: dict[str, asyncio.Lock] = {}
        self._create_lock = asyncio.Lock()
        self._boot_lock = asyncio.Lock()
        self._booting: dict[str, Vm] = {}
        self._background: set[asyncio.Task[None]] = set()
        backend.set_exit_listener(self._on_vmm_exit)

    @property
    def backend_type(self) -> str:
        return self._backend.capabilities.backend_type

    # ---- helpers -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _vm_lock(self, vm_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(vm_id, asyncio.Lock())
        async with lock:
            yield

    async def _owned(self, customer_id: str, vm_id: str) -> Vm:
        if not ids.VM_ID_PATTERN.fullmatch(vm_id):
            raise invalid("vm_id", "must match [A-Za-z0-9_-]{1,64}")
        vm = await self._store.get(vm_id)
        if vm is None or vm.pending == "creating":  # half-created: not there yet (or ever)
            raise not_found(vm_id)
        if vm.customer_id != customer_id:
            raise not_owned(vm_id, customer_id)
        return vm

    async def _save(self, vm: Vm, **changes: object) -> Vm:
        for key, value in changes.items():
            setattr(vm, key, value)
        vm.updated_at = datetime.now(UTC)
        try:
            await self._store.save(vm)
        except StoreFullError as exc:
            raise _store_full(exc) from exc
        return vm

    async def _backend_call(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        started = time.monotonic()
        try:
            result = await call()
        except MetaldError as exc:
            self._events.backend_error(self.backend_type, operation)
            if exc.code is ErrorCode.INTERNAL and await self._disk_nearly_full():
                raise _disk_full(operation, exc.message) from exc
            raise
        except OSError as exc:
            self._events.backend_error(self.backend_type, operation)
            if exc.errno == errno.ENOSPC or await self._disk_nearly_full():
                raise _disk_full(operation, str(exc)) from exc
            log.exception("backend %s failed", operation)
            raise _backend_failure(operation, exc) from exc
        except Exception as exc:
            self._events.backend_error(self.backend_type, operation)
            log.exception("backend %s failed", operation)
            raise _backend_failure(operation, exc) from exc
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

    def _vm_dir(self, vm_id: str) -> Path:
        return self._opts.vms_dir / vm_id

    async def _launch_spec(self, vm: Vm, attachment: NetworkAttachment | None) -> LaunchSpec:
        config = vm.config
        assert config.boot is not None and config.cpu is not None and config.console is not None
        kernel = await self._assets.resolve(config.boot.kernel_path, "config.boot.kernel_path")
        initrd = None
        if config.boot.initrd_path:
            initrd = await self._assets.resolve(config.boot.initrd_path, "config.boot.initrd_path")
        disks = []
        ordered = sorted(enumerate(config.storage), key=lambda p: (not p[1].is_root_device, p[0]))
        for i, dev in ordered:
            path = await self._assets.resolve(dev.path_on_host, f"config.storage[{i}].path_on_host")
            disks.append(DiskSpec(dev.device_id, path, dev.is_read_only, dev.is_root_device))
        vm_dir = self._vm_dir(vm.vm_id)
        return LaunchSpec(
            vm_id=vm.vm_id,
            vm_dir=vm_dir,
            vcpu_count=config.vcpu_count,
            memory_bytes=config.memory_bytes,
            cpu_template=config.cpu.cpu_template,
            kernel=kernel,
            initrd=initrd,
            customer_kernel_args=config.boot.kernel_args,
            guest_kernel_args=guest_kernel_args(vm.vm_id, vm.nics),
            disks=tuple(disks),
            nics=attachment.nics if attachment else (),
            netns=attachment.namespace if attachment else None,
            console_type=config.console.type,
            console_path=self._console_path(vm),
            labels={"customer_id": vm.customer_id},
        )

    def _console_path(self, vm: Vm) -> Path:
        console = vm.config.console
        return self._vm_dir(vm.vm_id) / ((console.output_file if console else "") or "console.log")

    async def read_console(self, customer_id: str, vm_id: str, offset: int, limit: int) -> ConsoleChunk:
        path = self._console_path(await self._owned(customer_id, vm_id))
        return await asyncio.to_thread(_read_chunk, path, offset, limit)

    def _check_capabilities(self, config: VmConfig) -> None:
        caps = self._backend.capabilities
        assert config.cpu is not None and config.console is not None and config.boot is not None
        template = config.cpu.cpu_template
        if template and template not in caps.cpu_templates:
            raise invalid(
                "config.cpu.cpu_template",
                f"{template} cannot be honoured by the {caps.backend_type} backend on this host",
            )
        if config.console.type not in caps.console_types:
            raise invalid(
                "config.console.type",
                f"{config.console.type} is not supported by the {caps.backend_type} backend",
            )
        if config.boot.initrd_path and not caps.supports_initrd:
            raise invalid("config.boot.initrd_path", f"the {caps.backend_type} backend cannot load an initrd")
        if config.vcpu_count > caps.max_vcpus:
            raise invalid("config.cpu.vcpu_count", f"at most {caps.max_vcpus} on this backend")
        if config.network and self._network is None:
            raise MetaldError(
                ErrorCode.FAILED_PRECONDITION,
                "networking is disabled on this host (network_enabled=false)",
                reason="NETWORK_DISABLED",
            )

    async def _capacity_check(self, vm: Vm) -> None:
        """Called under the boot lock; boots in flight count as running, so concurrent boots
        cannot both take the last capacity."""
        active = sorted(ACTIVE_STATES)
        customer = Usage(*await self._store.usage(vm.customer_id, active))
        host = Usage(*await self._store.usage(None, active))
        for other in self._booting.values():
            host = Usage(
                host.vms + 1,
                host.vcpus + other.config.vcpu_count,
                host.memory_bytes + other.config.memory_bytes,
            )
            if other.customer_id == vm.customer_id:
                customer = Usage(
                    customer.vms + 1,
                    customer.vcpus + other.config.vcpu_count,
                    customer.memory_bytes + other.config.memory_bytes,
                )
        check_boot(self._opts.quotas, customer, host, vm.config.vcpu_count, vm.config.memory_bytes)

    # ---- use cases -----------------------------------------------------------------------------

    async def create(self, customer_id: str, vm_id: str, config: VmConfig, claimed_customer: str) -> Vm:
        if claimed_customer and claimed_customer != customer_id:
            raise MetaldError(
                ErrorCode.PERMISSION_DENIED,
                "customer_id does not match the authenticated customer",
                reason="CUSTOMER_MISMATCH",
                metadata={"customer_id": customer_id},
            )
        if vm_id:
            ids.check_vm_id(vm_id)
        else:
            vm_id = ids.new_vm_id()
        validate_config(config, self._opts.limits)
        await self._require_disk_room()
        config = with_defaults(config, self._opts.defaults)
        self._check_capabilities(config)
        now = datetime.now(UTC)
        vm = Vm(vm_id, customer_id, config, VmState.CREATED, now, now, pending="creating")
        spec = await self._launch_spec(vm, None)  # resolves and checks every host path first
        async with self._create_lock:
            if await self._store.get(vm_id) is not None:
                raise MetaldError(
                    ErrorCode.ALREADY_EXISTS,
                    f"VM {vm_id} already exists",
                    reason="VM_EXISTS",
                    metadata={"vm_id": vm_id},
                )
            customer_vms, _, _ = await self._store.usage(customer_id)
            host_vms, _, _ = await self._store.usage(None)
            check_create(self._opts.quotas, customer_vms, host_vms)
            try:
                vm = await self._store.insert(vm)
            except KeyError:
                raise MetaldError(
                    ErrorCode.ALREADY_EXISTS, f"VM {vm_id} already exists", reason="VM_EXISTS"
                ) from None
            except StoreFullError as exc:
                raise _store_full(exc) from exc
        async with self._vm_lock(vm_id):
            try:
                if self._network is not None and config.network:
                    vm.nics = await self._network.plan(vm)
                    spec = dataclasses.replace(spec, guest_kernel_args=guest_kernel_args(vm_id, vm.nics))
                await self._backend_call("prepare", lambda: self._backend.prepare(spec))
                return await self._save(vm, pending="")
            except BaseException:
                await self._undo_create(vm)
                raise

    async def _undo_create(self, vm: Vm) -> None:
        """Remove a half-created VM; if that fails too (disk full), keep retrying in the background.
        Meanwhile the VM stays hidden (pending "creating" is neither listed nor found)."""
        try:
            await self._finish_delete(vm)
        except Exception:
            log.warning("could not undo the create of %s yet; retrying", vm.vm_id, extra={"vm_id": vm.vm_id})
            task = asyncio.create_task(self._retry_undo_create(vm))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _retry_undo_create(self, vm: Vm) -> None:
        while True:
            await asyncio.sleep(UNDO_RETRY_SECONDS)
            async with self._vm_lock(vm.vm_id):
                with contextlib.suppress(Exception):
                    await self._finish_delete(vm)
                    log.info("undid the create of %s", vm.vm_id, extra={"vm_id": vm.vm_id})
                    return

    async def boot(self, customer_id: str, vm_id: str, *, wait_for_ready: bool, wait_timeout: float) -> Vm:
        await self._owned(customer_id, vm_id)
        async with self._vm_lock(vm_id):
            vm = await self._owned(customer_id, vm_id)
            require_allowed(Operation.BOOT, vm_id, vm.state)
            await self._require_disk_room()
            started = time.monotonic()
            previous, previous_reason = vm.state, vm.shutdown_reason
            async with self._boot_lock:
                await self._capacity_check(vm)
                self._booting[vm_id] = vm
            try:
                await self._save(vm, pending="booting")
                attachment = await self._attach(vm)
                spec = await self._launch_spec(vm, attachment)
                await self._backend_call("start", lambda: self._backend.start(spec))
                vm = await self._save(vm, state=VmState.RUNNING, pending="", shutdown_reason="")
            except BaseException:
                await self._stop_quietly(vm)
                with contextlib.suppress(Exception):  # the original error is the one to report
                    await self._save(vm, state=previous, pending="", shutdown_reason=previous_reason)
                raise
            finally:
                self._booting.pop(vm_id, None)
            self._events.boot_finished(self.backend_type, time.monotonic() - started)
        if wait_for_ready:
            timeout = wait_timeout or self._opts.boot_wait_timeout
            if not await self._backend.wait_ready(vm_id, timeout):
                raise MetaldError(
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"VM {vm_id} is running but its guest did not report ready within {timeout:g}s",
                    reason="GUEST_NOT_READY",
                    metadata={"vm_id": vm_id},
                )
        return vm

    async def _attach(self, vm: Vm) -> NetworkAttachment | None:
        if self._network is None or not vm.config.network:
            return None
        network = self._network
        return await self._backend_call("network_attach", lambda: network.attach(vm))

    async def _stop_quietly(self, vm: Vm) -> None:
        """Best-effort teardown after a failed boot: no VMM, no network left behind."""
        with contextlib.suppress(Exception):
            await self._backend.stop(vm.vm_id, graceful=False, timeout=0)
        if self._network is not None and vm.config.network:
            with contextlib.suppress(Exception):
                await self._network.detach(vm)

    async def _simple(
        self, customer_id: str, vm_id: str, op: Operation, action: Callable[[], Awaitable[None]]
    ) -> Vm:
        async with self._vm_lock(vm_id):
            vm = await self._owned(customer_id, vm_id)
            require_allowed(op, vm_id, vm.state)
            await self._require_disk_room()
            await self._backend_call(op.value, action)
            return await self._save(vm, state=TARGET[op])

    async def pause(self, customer_id: str, vm_id: str) -> Vm:
        await self._owned(customer_id, vm_id)
        return await self._simple(customer_id, vm_id, Operation.PAUSE, lambda: self._backend.pause(vm_id))

    async def resume(self, customer_id: str, vm_id: str) -> Vm:
        await self._owned(customer_id, vm_id)
        return await self._simple(customer_id, vm_id, Operation.RESUME, lambda: self._backend.resume(vm_id))

    async def reboot(self, customer_id: str, vm_id: str, *, force: bool) -> Vm:
        await self._owned(customer_id, vm_id)
        return await self._simple(
            customer_id, vm_id, Operation.REBOOT, lambda: self._backend.reboot(vm_id, force=force)
        )

    async def shutdown(self, customer_id: str, vm_id: str, *, force: bool, timeout_seconds: float) -> Vm:
        await self._owned(customer_id, vm_id)
        if timeout_seconds < 0:
            raise invalid("timeout_seconds", "must not be negative")
        async with self._vm_lock(vm_id):
            vm = await self._owned(customer_id, vm_id)
            require_allowed(Operation.SHUTDOWN, vm_id, vm.state)
            await self._require_disk_room()
            return await self._stop(vm, force=force, timeout=timeout_seconds or self._opts.shutdown_timeout)

    async def _stop(self, vm: Vm, *, force: bool, timeout: float) -> Vm:
        await self._save(vm, pending="stopping")
        reason = await self._backend_call(
            "stop", lambda: self._backend.stop(vm.vm_id, graceful=not force, timeout=timeout)
        )
        if self._network is not None and vm.config.network:
            await self._network.detach(vm)
        return await self._save(vm, state=VmState.SHUTDOWN, pending="", shutdown_reason=reason)

    async def delete(self, customer_id: str, vm_id: str, *, force: bool) -> None:
        await self._owned(customer_id, vm_id)
        async with self._vm_lock(vm_id):
            vm = await self._owned(customer_id, vm_id)
            require_allowed(Operation.DELETE, vm_id, vm.state, force=force)
            await self._save(vm, pending="deleting")
            await self._finish_delete(vm)
        self._locks.pop(vm_id, None)

    async def _finish_delete(self, vm: Vm) -> None:
        await self._backend_call("destroy", lambda: self._backend.destroy(vm.vm_id, self._vm_dir(vm.vm_id)))
        if self._network is not None and vm.config.network:
            await self._network.detach(vm)
            await self._network.release(vm)
        await self._store.delete(vm.vm_id)

    async def info(self, customer_id: str, vm_id: str) -> VmDetails:
        vm = await self._owned(customer_id, vm_id)
        runtime = None
        metrics = VmMetrics()
        attachment = None
        if vm.state in ACTIVE_STATES:
            runtime = await self._backend.runtime(vm_id)
            if runtime is not None:
                metrics = await self._backend.metrics(vm_id)
        if self._network is not None and vm.config.network:
            attachment = await self._network.describe(vm)
            if attachment is not None:
                rx, tx = await self._network.counters(vm)
                metrics = dataclasses.replace(metrics, network_rx_bytes=rx, network_tx_bytes=tx)
        return VmDetails(vm, self.backend_type, runtime, metrics, attachment)

    async def list(
        self, customer_id: str, states: Sequence[VmState], page_size: int, page_token: str
    ) -> Page:
        if page_size < 0:
            raise invalid("page_size", "must not be negative")
        if any(s is VmState.UNSPECIFIED for s in states):
            raise invalid("state_filter", "VM_STATE_UNSPECIFIED is not a state to filter by")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        wanted = sorted(set(states))
        filter_key = ",".join(str(int(s)) for s in wanted)
        after = self._tokens.decode(page_token, customer_id, filter_key) if page_token else 0
        rows = await self._store.list_page(customer_id, wanted, after, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        token = self._tokens.encode(customer_id, filter_key, rows[-1].seq) if more else ""
        total = await self._store.count(customer_id, wanted)
        return Page(rows, token, total)

    # ---- not built yet (issue 15): answered UNIMPLEMENTED until they are -----------------------

    async def watch(
        self, customer_id: str, states: Sequence[VmState], vm_ids: Sequence[str], after_cursor: str
    ) -> AsyncIterator[WatchItem]:
        raise _unimplemented("WatchVms")
        yield  # pragma: no cover

    # ---- inside the guest (metald/guestwork.py) ---------------------------------------------

    def _guest(self, rpc: str) -> GuestWork:
        if self._guest_work is None:
            raise _unimplemented(rpc)
        return self._guest_work

    async def exec(self, customer_id: str, vm_id: str, command: ExecCommand) -> ExecResult:
        return await self._guest("ExecVm").exec(customer_id, vm_id, command)

    async def write_file(self, customer_id: str, vm_id: str, path: str, content: bytes, mode: int) -> None:
        await self._guest("WriteFile").write_file(customer_id, vm_id, path, content, mode)

    async def read_file(self, customer_id: str, vm_id: str, path: str) -> GuestFile:
        return await self._guest("ReadFile").read_file(customer_id, vm_id, path)

    # ---- events and recovery -------------------------------------------------------------------

    async def _on_vmm_exit(self, vm_id: str, reason: str) -> None:
        """A VMM ended by itself (guest poweroff, crash): record SHUTDOWN and clean its network."""
        async with self._vm_lock(vm_id):
            vm = await self._store.get(vm_id)
            if vm is None or vm.state not in ACTIVE_STATES or vm.pending:
                return
            log.warning("VMM of %s exited without a request: %s", vm_id, reason, extra={"vm_id": vm_id})
            self._events.vm_exited(reason)
            if self._network is not None and vm.config.network:
                with contextlib.suppress(Exception):
                    await self._network.detach(vm)
            await self._save(vm, state=VmState.SHUTDOWN, shutdown_reason=reason)

    async def recover(self) -> None:
        """After a (re)start: finish or undo half-done operations and re-adopt running VMMs."""
        live: set[str] = set()
        for vm in await self._store.all_vms():
            try:
                if await self._recover_one(vm):
                    live.add(vm.vm_id)
            except Exception:
                log.exception("recovery of %s failed", vm.vm_id, extra={"vm_id": vm.vm_id})
        if self._network is not None:
            removed = await self._network.remove_orphans(live)
            if removed:
                log.info("removed orphaned network devices: %s", ", ".join(removed))

    async def _recover_one(self, vm: Vm) -> bool:
        """Returns True if the VM's VMM runs after recovery."""
        async with self._vm_lock(vm.vm_id):
            if vm.pending == "creating":
                log.info("undoing half-done create of %s", vm.vm_id)
                await self._undo_create(vm)
                return False
            if vm.pending == "deleting":
                log.info("finishing half-done delete of %s", vm.vm_id)
                await self._finish_delete(vm)
                return False
            if vm.state not in ACTIVE_STATES and vm.pending not in ("booting", "stopping"):
                return False
            attachment = None
            if self._network is not None and vm.config.network:
                attachment = await self._network.describe(vm)
            runtime = await self._backend.adopt(await self._launch_spec(vm, attachment))
            if runtime is not None and vm.pending == "stopping":
                await self._stop(vm, force=True, timeout=0)
                return False
            if runtime is not None:
                state = VmState.PAUSED if runtime.paused else VmState.RUNNING
                await self._save(vm, state=state, pending="")
                log.info("re-adopted %s (pid %d)", vm.vm_id, runtime.pid, extra={"vm_id": vm.vm_id})
                return True
            if self._network is not None and vm.config.network:
                await self._network.detach(vm)
            if vm.state in ACTIVE_STATES or vm.pending == "stopping":
                reason = self._backend.last_exit_reason(vm.vm_id) or "vmm_gone_while_daemon_down"
                await self._save(vm, state=VmState.SHUTDOWN, pending="", shutdown_reason=reason)
            else:
                await self._save(vm, pending="")
            return False


def _unimplemented(rpc: str) -> MetaldError:
    return MetaldError(
        ErrorCode.UNIMPLEMENTED, f"{rpc} is not available on this host yet", reason="UNIMPLEMENTED"
    )


def _store_full(exc: StoreFullError) -> MetaldError:
    return MetaldError(
        ErrorCode.RESOURCE_EXHAUSTED,
        f"the state store cannot write ({exc}); nothing was changed",
        reason="STORE_FULL",
    )


def _backend_failure(operation: str, exc: Exception) -> MetaldError:
    return MetaldError(
        ErrorCode.INTERNAL,
        f"backend failure during {operation}: {exc}",
        reason="BACKEND_FAILURE",
        metadata={"operation": operation},
    )


def _disk_full(operation: str, detail: str) -> MetaldError:
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


def _read_chunk(path: Path, offset: int, limit: int) -> ConsoleChunk:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP):  # not written yet, or not a plain file
            return ConsoleChunk(b"", offset, 0)
        raise
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, limit, offset) if offset < size else b""
    finally:
        os.close(fd)
    return ConsoleChunk(data, offset + len(data), size)
