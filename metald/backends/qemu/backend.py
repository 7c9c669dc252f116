"""QemuBackend: metald.ports.Backend on QEMU microvm, one supervised QEMU process per VM."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metald.backends import procfs
from metald.backends.qemu import layout, snapshot
from metald.backends.qemu.accel import AccelSelector, ProbeAssets, host_tsc_khz, qemu_version
from metald.backends.qemu.agent import GuestAgent
from metald.backends.qemu.cmdline import CPU_TEMPLATES, HostOptions, cpu_model, name_matches, qemu_argv
from metald.backends.qemu.files import RamFile, VmmFileError, close_fds, open_vmm_files
from metald.backends.qemu.overlay import prepare_vm_dir, recorded_chains
from metald.backends.qemu.qmp import QmpClient, QmpClosedError, QmpError
from metald.backends.vmm.cgroups import VMM_MEMORY_OVERHEAD, Cgroups, cgroup_name, vmm_limits
from metald.backends.vmm.console import ReadyWatch, file_size
from metald.backends.vmm.jsonfile import read_json, write_json_atomic
from metald.backends.vmm.process import (
    VmmProcess,
    VmmStartError,
    exit_reason,
    read_exit,
    read_log_tail,
    remove_cgroup,
)
from metald.backends.vmm.sandbox import VmmUser, kvm_group, wrap_argv
from metald.domain.errors import ErrorCode, MetaldError
from metald.ports import (
    BackendCapabilities,
    CheckResult,
    ExitListener,
    LaunchSpec,
    SnapshotResult,
    VmMetrics,
    VmRuntime,
)

log = logging.getLogger(__name__)

_CTRL_ALT_DEL = ("ctrl", "alt", "delete")
QMP_CONNECT_TIMEOUT = 10.0
AGENT_PING_TIMEOUT = 1.5  # the agent polls its port once a second while nobody is connected
QUIT_TIMEOUT = 5.0
KILL_TIMEOUT = 10.0
READY_POLL_INTERVAL = 0.05


@dataclass
class _ShutdownSeen:
    """The QMP SHUTDOWN event, if one came: did the guest ask to end (poweroff) or the host?"""

    guest: bool | None = None

    def on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "SHUTDOWN":
            self.guest = bool(event.get("data", {}).get("guest"))


@dataclass
class _RunningVm:
    vm_id: str
    vm_dir: Path
    vmm: VmmProcess
    qmp: QmpClient
    watch: ReadyWatch
    accel: str
    cpu_model: str
    shutdown: _ShutdownSeen
    ram_fd: int | None = None  # the RAM file's descriptor in QEMU (snapshots read it)
    restored: bool = False  # a clone restored from a snapshot: no ready line, the agent tells
    agent_seen: bool = False  # a restored guest's agent answered since its restore
    stopping: bool = False  # set by stop(): the exit is ours, the exit listener is not told
    monitor: asyncio.Task[None] | None = field(default=None, repr=False)


def _write_boot_state(vm: _RunningVm) -> None:
    data = {
        "console_offset": vm.watch.offset,
        "accel": vm.accel,
        "cpu_model": vm.cpu_model,
        "ram_fd": vm.ram_fd,
        "restored": vm.restored,
    }
    write_json_atomic(vm.vm_dir / layout.BOOT_STATE, data)


def remove_runtime_files(vm_dir: Path) -> None:
    for name in layout.RUNTIME_FILES:
        with contextlib.suppress(FileNotFoundError):
            (vm_dir / name).unlink()


def _vmm_failed(vm_id: str, message: str) -> MetaldError:
    return MetaldError(
        ErrorCode.INTERNAL, f"VM {vm_id}: {message}", reason="VMM_FAILED", metadata={"vm_id": vm_id}
    )


class QemuBackend:
    """Runs each VM as `qemu-system-x86_64 -M microvm` under a per-VM supervisor (vmm/supervisor.py).

    The daemon never is QEMU's parent: VMs survive a daemon restart and are re-adopted with adopt().
    Exits are seen through pidfds (vmm/process.py); an exit that stop() did not cause goes to the
    exit listener as "guest_poweroff" (the guest powered off), "oom_killed" (QEMU outgrew its
    cgroup's memory limit) or "vmm_crashed" (anything else).

    Sandbox: QEMU runs as `vmm_user` (None: the daemon's own user) with seccomp (`-sandbox on`), in
    its own cgroup of `cgroups` (None: no limits) with the limits of vmm/cgroups.py, and opens no
    host file itself (files.py). `memory_overhead` is the cgroup's memory allowance above guest RAM.
    """

    def __init__(
        self,
        *,
        qemu_binary: str,
        qemu_img_binary: str,
        accel: str,
        state_dir: Path,
        probe_kernel: Path | None,
        probe_initrd: Path | None,
        probe_rootfs: Path | None,
        vmm_user: VmmUser | None = None,
        cgroups: Cgroups | None = None,
        memory_overhead: int = VMM_MEMORY_OVERHEAD,
        ram_dir: Path | None = None,
    ) -> None:
        self._binary = qemu_binary
        self._img_binary = qemu_img_binary
        self._user = vmm_user
        # Under KVM the VMM also needs /dev/kvm, through the group that may open it.
        self._kvm_user = vmm_user.with_group(kvm_group()) if vmm_user is not None else None
        self._cgroups = cgroups
        self._memory_overhead = memory_overhead
        # Guest RAM in files of ram_dir (tmpfs) makes VMs snapshottable; None: anonymous memory.
        self._ram = RamFile(ram_dir, vmm_user.uid if vmm_user else None) if ram_dir else None
        self._tsc_khz = host_tsc_khz()
        assets = (
            ProbeAssets(probe_kernel, probe_initrd, probe_rootfs)
            if probe_kernel is not None and probe_rootfs is not None
            else None
        )
        self._accel = AccelSelector(
            mode=accel,
            binary=qemu_binary,
            state_dir=state_dir,
            assets=assets,
            tsc_khz=self._tsc_khz,
            user=self._kvm_user,
        )
        self._vms: dict[str, _RunningVm] = {}
        self._last_exit: dict[str, str] = {}
        self._listener: ExitListener | None = None
        self.capabilities = BackendCapabilities(
            backend_type="qemu",
            cpu_templates=dict(CPU_TEMPLATES),
            console_types=frozenset({"SERIAL", "VIRTIO_CONSOLE"}),
            supports_snapshots=self._ram is not None,
        )

    def set_exit_listener(self, listener: ExitListener) -> None:
        self._listener = listener

    # ---- files ------------------------------------------------------------------------------

    async def prepare(self, spec: LaunchSpec) -> None:
        await prepare_vm_dir(spec, qemu_img=self._img_binary)

    async def destroy(self, vm_id: str, vm_dir: Path) -> None:
        if vm_id in self._vms:
            await self.stop(vm_id, graceful=False, timeout=0)
        elif (
            vmm := await VmmProcess.attach(vm_dir, functools.partial(name_matches, vm_id=vm_id))
        ) is not None:
            await self._kill_and_forget(vmm)
        await self._remove_cgroup(vm_id, vm_dir)
        self._last_exit.pop(vm_id, None)
        await asyncio.to_thread(shutil.rmtree, vm_dir, True)

    async def _remove_cgroup(self, vm_id: str, vm_dir: Path) -> None:
        """The VM's cgroup, if a crash left it (its supervisor removes it when QEMU ends)."""
        if self._cgroups is not None:
            await remove_cgroup(self._cgroups.dirs(cgroup_name(vm_id, vm_dir)))

    async def _create_cgroup(self, spec: LaunchSpec) -> list[Path]:
        if self._cgroups is None:
            return []
        limits = vmm_limits(spec.vcpu_count, spec.memory_bytes, self._memory_overhead)
        try:
            return await asyncio.to_thread(self._cgroups.create, cgroup_name(spec.vm_id, spec.vm_dir), limits)
        except OSError as e:
            raise _vmm_failed(spec.vm_id, f"cannot create its cgroup {e.filename}: {e.strerror}") from e

    # ---- starting and re-adopting ------------------------------------------------------------

    async def start(self, spec: LaunchSpec) -> VmRuntime:
        if (runtime := await self.adopt(spec)) is not None:
            return runtime  # already running (e.g. a retried BootVm): never a second QEMU
        accel = self._accel.current()
        try:
            model = cpu_model(spec.cpu_template, accel)
        except KeyError:
            raise MetaldError(
                ErrorCode.INVALID_ARGUMENT,
                f"cpu_template {spec.cpu_template!r} is not supported by the qemu backend",
                reason="INVALID_FIELD",
                metadata={"field": "config.cpu.cpu_template"},
            ) from None
        await self.prepare(spec)
        self._last_exit.pop(spec.vm_id, None)
        host = HostOptions(binary=self._binary, accel=accel, tsc_khz=self._tsc_khz)
        user = self._kvm_user if accel == "kvm" else self._user
        offset = await asyncio.to_thread(file_size, spec.console_path)
        try:
            fds = await asyncio.to_thread(open_vmm_files, spec, self._ram)
        except VmmFileError as e:
            raise _vmm_failed(spec.vm_id, str(e)) from e
        try:
            cgroup = await self._create_cgroup(spec)
            argv = wrap_argv(qemu_argv(spec, host, fds), netns=spec.netns, user=user)
            vmm = await VmmProcess.spawn(spec.vm_dir, argv, pass_fds=fds.all(), cgroup=cgroup)
        except VmmStartError as e:
            raise _vmm_failed(spec.vm_id, str(e)) from e
        finally:
            close_fds(fds)
        watch = ReadyWatch(spec.console_path, spec.vm_id, offset)
        try:
            vm = await self._attach_qmp(spec, vmm, watch, accel, model)
        except BaseException:  # cancelled: no QEMU may run untracked
            vmm.kill()
            vmm.detach()
            raise
        if vm is None:
            tail = await asyncio.to_thread(read_log_tail, spec.vm_dir, vmm.log_offset)
            raise _vmm_failed(spec.vm_id, f"QEMU did not come up: {tail}")
        vm.ram_fd = fds.ram
        if fds.incoming is not None:
            await self._restore(vm, fds.incoming)
        await asyncio.to_thread(_write_boot_state, vm)
        log.info("vm %s: qemu pid %d started (%s, cpu %s)", spec.vm_id, vmm.pid, accel, model)
        return await self._runtime(vm)

    async def adopt(self, spec: LaunchSpec) -> VmRuntime | None:
        if (vm := self._vms.get(spec.vm_id)) is not None:
            return await self._runtime(vm)
        vmm = await VmmProcess.attach(spec.vm_dir, functools.partial(name_matches, vm_id=spec.vm_id))
        if vmm is None:  # ended while no daemon watched: keep why, for last_exit_reason()
            if (info := await asyncio.to_thread(read_exit, spec.vm_dir)) is not None:
                self._last_exit[spec.vm_id] = exit_reason(info)
            await asyncio.to_thread(remove_runtime_files, spec.vm_dir)
            await self._remove_cgroup(spec.vm_id, spec.vm_dir)
            return None
        boot = await asyncio.to_thread(read_json, spec.vm_dir / layout.BOOT_STATE) or {}
        watch = ReadyWatch(spec.console_path, spec.vm_id, int(boot.get("console_offset", 0)))
        accel = str(boot.get("accel", "tcg"))
        model = str(boot.get("cpu_model", "unknown"))
        vm = await self._attach_qmp(spec, vmm, watch, accel, model)
        if vm is None:
            return None
        vm.ram_fd = boot.get("ram_fd")
        vm.restored = bool(boot.get("restored", False))
        log.info("vm %s: re-adopted qemu pid %d", spec.vm_id, vmm.pid)
        return await self._runtime(vm)

    async def _attach_qmp(
        self, spec: LaunchSpec, vmm: VmmProcess, watch: ReadyWatch, accel: str, model: str
    ) -> _RunningVm | None:
        """Connect QMP and start watching the VM; a VMM that cannot be controlled is killed (None)."""
        shutdown = _ShutdownSeen()
        try:
            qmp = await QmpClient.connect(
                spec.vm_dir,
                layout.QMP_SOCKET,
                timeout=QMP_CONNECT_TIMEOUT,
                on_event=shutdown.on_event,
                alive=lambda: vmm.running,
            )
        except (OSError, QmpError, TimeoutError, ValueError):
            await self._kill_and_forget(vmm)
            return None
        vm = _RunningVm(spec.vm_id, spec.vm_dir, vmm, qmp, watch, accel, model, shutdown)
        vm.monitor = asyncio.create_task(self._monitor(vm))
        self._vms[spec.vm_id] = vm
        return vm

    async def _kill_and_forget(self, vmm: VmmProcess) -> None:
        vmm.kill()
        await asyncio.wait({vmm.exited}, timeout=KILL_TIMEOUT)
        vmm.detach()
        await asyncio.to_thread(remove_runtime_files, vmm.vm_dir)

    async def _monitor(self, vm: _RunningVm) -> None:
        """Runs until the VMM ends: cleans up, and tells the listener if nobody asked for it."""
        try:
            info = await vm.vmm.exited
        except asyncio.CancelledError:
            return  # detached (daemon shutdown): the VM runs on
        await vm.qmp.close()
        await asyncio.to_thread(remove_runtime_files, vm.vm_dir)
        if self._vms.get(vm.vm_id) is vm:
            del self._vms[vm.vm_id]
        if vm.stopping:
            return
        reason = exit_reason(info, guest_poweroff=vm.shutdown.guest)
        self._last_exit[vm.vm_id] = reason
        log.info("vm %s: qemu exited (%s) without a stop request: %s", vm.vm_id, info, reason)
        if self._listener is not None:
            try:
                await self._listener(vm.vm_id, reason)
            except Exception:
                log.exception("vm %s: exit listener failed", vm.vm_id)

    # ---- lifecycle ----------------------------------------------------------------------------

    def _get(self, vm_id: str) -> _RunningVm:
        vm = self._vms.get(vm_id)
        if vm is None:
            raise MetaldError(
                ErrorCode.FAILED_PRECONDITION,
                f"VM {vm_id} has no running VMM",
                reason="VMM_NOT_RUNNING",
                metadata={"vm_id": vm_id},
            )
        return vm

    async def _qmp(self, vm: _RunningVm, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            return await vm.qmp.execute(command, arguments)
        except (QmpError, QmpClosedError, TimeoutError) as e:
            raise _vmm_failed(vm.vm_id, f"QMP {command} failed: {e}") from e

    async def _restore(self, vm: _RunningVm, state_fd: int) -> None:
        """Load a clone's device state; a VMM that cannot be restored is not left running."""
        try:
            await snapshot.restore(vm.qmp, state_fd)
        except (snapshot.SnapshotError, QmpError, QmpClosedError, TimeoutError) as e:
            await self.stop(vm.vm_id, graceful=False, timeout=0)
            raise _vmm_failed(vm.vm_id, f"cannot restore the snapshot: {e}") from e
        vm.restored = True

    async def snapshot(self, vm_id: str, dest: Path) -> SnapshotResult:
        vm = self._get(vm_id)
        if vm.ram_fd is None:
            raise MetaldError(
                ErrorCode.FAILED_PRECONDITION,
                f"VM {vm_id} was started without its RAM in a file; reboot it to make it snapshottable",
                reason="SNAPSHOT_UNSUPPORTED",
                metadata={"vm_id": vm_id},
            )
        chains = await asyncio.to_thread(recorded_chains, vm.vm_dir)
        status = await self._qmp(vm, "query-status")
        try:
            saved = await snapshot.save(
                vm.qmp,
                ram=Path(f"/proc/{vm.vmm.pid}/fd/{vm.ram_fd}"),
                overlays=[vm.vm_dir / name for name in sorted(chains)],
                dest=dest,
                resume=status.get("status") == "running",
            )
        except (snapshot.SnapshotError, QmpError, QmpClosedError, TimeoutError) as e:
            raise _vmm_failed(vm_id, f"snapshot failed: {e}") from e
        await asyncio.to_thread(write_json_atomic, dest / layout.DISKS_STATE, chains)
        if self._ram is not None and self._ram.owner is not None:  # clones' QEMUs reopen it
            await asyncio.to_thread(os.chown, dest / snapshot.RAM_FILE, self._ram.owner, -1)
        return SnapshotResult(saved.size_bytes, saved.paused_seconds)

    async def _guest_ready(self, vm: _RunningVm) -> bool:
        """A booted guest is ready once its ready line is out; a restored one once its agent answers."""
        if not vm.restored:
            return await vm.watch.poll()
        if not vm.agent_seen:
            vm.agent_seen = await self._agent_ping(vm)
        return vm.agent_seen

    async def _agent_ping(self, vm: _RunningVm) -> bool:
        try:
            agent = await GuestAgent.connect(vm.vm_dir)
        except OSError:
            return False
        try:
            return await agent.ping(AGENT_PING_TIMEOUT)
        except (OSError, TimeoutError):
            return False
        finally:
            await agent.close()

    async def wait_ready(self, vm_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (vm := self._vms.get(vm_id)) is not None:
            if await self._guest_ready(vm):
                return True
            if time.monotonic() >= deadline or not vm.vmm.running:
                return False
            await asyncio.sleep(READY_POLL_INTERVAL)
        return False

    async def pause(self, vm_id: str) -> None:
        await self._qmp(self._get(vm_id), "stop")

    async def resume(self, vm_id: str) -> None:
        await self._qmp(self._get(vm_id), "cont")

    async def reboot(self, vm_id: str, *, force: bool) -> None:
        """force: system_reset. Graceful: the guest agent's `reboot` if it answers a ping quickly,
        else Ctrl-Alt-Del on the i8042 keyboard (the default guest's init reboots on it)."""
        vm = self._get(vm_id)
        await self._new_boot(vm)
        if force:
            await self._qmp(vm, "system_reset")
        elif not await self._agent_command(vm, "reboot"):
            await self._qmp(vm, "send-key", {"keys": [{"type": "qcode", "data": k} for k in _CTRL_ALT_DEL]})

    async def _new_boot(self, vm: _RunningVm) -> None:
        """The guest is about to boot again: watch for its ready line from the console's end."""
        offset = await asyncio.to_thread(file_size, vm.watch.path)
        vm.watch = ReadyWatch(vm.watch.path, vm.vm_id, offset)
        vm.restored = False  # a rebooted clone prints its ready line like any guest
        await asyncio.to_thread(_write_boot_state, vm)

    async def _agent_command(self, vm: _RunningVm, command: str) -> bool:
        """True if the guest agent answered a ping in time and acknowledged `command`."""
        try:
            agent = await GuestAgent.connect(vm.vm_dir)
        except OSError:
            return False
        try:
            return await agent.ping(AGENT_PING_TIMEOUT) and await agent.command(command) == "ok"
        except (OSError, TimeoutError):
            return False
        finally:
            await agent.close()

    async def stop(self, vm_id: str, *, graceful: bool, timeout: float) -> str:
        """Graceful: ACPI power button if the guest is up, wait `timeout`, then QMP quit, then SIGKILL.
        Not graceful: SIGKILL. Returns "guest_poweroff", "quit", "killed" or "not_running"."""
        vm = self._vms.get(vm_id)
        if vm is None:
            return "not_running"
        vm.stopping = True
        if graceful:
            with contextlib.suppress(MetaldError):
                if await vm.watch.poll():  # else the power button would be lost: quit at once
                    status = await self._qmp(vm, "query-status")
                    if status.get("status") == "paused":
                        await self._qmp(vm, "cont")
                    await self._qmp(vm, "system_powerdown")
                    if await self._ended(vm, timeout):
                        return "guest_poweroff"
            with contextlib.suppress(MetaldError):
                await self._qmp(vm, "quit")
            if await self._ended(vm, QUIT_TIMEOUT):
                return "quit"
        vm.vmm.kill()
        if not await self._ended(vm, KILL_TIMEOUT):
            raise _vmm_failed(vm_id, f"QEMU pid {vm.vmm.pid} survived SIGKILL")
        return "killed"

    @staticmethod
    async def _ended(vm: _RunningVm, timeout: float) -> bool:
        """Wait up to `timeout` for the VMM to end and be cleaned up."""
        assert vm.monitor is not None
        try:
            await asyncio.wait_for(asyncio.shield(vm.monitor), timeout)
        except TimeoutError:
            return False
        return True

    # ---- observing ----------------------------------------------------------------------------

    async def _runtime(self, vm: _RunningVm) -> VmRuntime:
        status: dict[str, Any] = {}
        with contextlib.suppress(QmpError, QmpClosedError, TimeoutError):
            status = await vm.qmp.execute("query-status", timeout=2.0)
        return VmRuntime(
            pid=vm.vmm.pid,
            socket_path=str(vm.vm_dir / layout.QMP_SOCKET),
            guest_ready=vm.agent_seen if vm.restored else await vm.watch.poll(),
            paused=status.get("status") == "paused",
            extra={"accelerator": vm.accel, "cpu_model": vm.cpu_model},
        )

    async def runtime(self, vm_id: str) -> VmRuntime | None:
        vm = self._vms.get(vm_id)
        return None if vm is None else await self._runtime(vm)

    def last_exit_reason(self, vm_id: str) -> str | None:
        return self._last_exit.get(vm_id)

    async def metrics(self, vm_id: str) -> VmMetrics:
        vm = self._vms.get(vm_id)
        if vm is None:
            return VmMetrics()
        read = written = 0
        with contextlib.suppress(QmpError, QmpClosedError, TimeoutError):
            for device in await vm.qmp.execute("query-blockstats", timeout=2.0):
                read += int(device["stats"]["rd_bytes"])
                written += int(device["stats"]["wr_bytes"])
        stat = procfs.read_stat(vm.vmm.pid)
        return VmMetrics(
            cpu_time_nanos=stat.cpu_time_nanos if stat else 0,
            memory_usage_bytes=procfs.read_rss_bytes(vm.vmm.pid),
            disk_read_bytes=read,
            disk_write_bytes=written,
        )

    async def ping(self) -> CheckResult:
        started = time.monotonic()
        try:
            version = await qemu_version(self._binary)
        except OSError as e:
            return CheckResult("unhealthy", f"{self._binary}: {e}", (time.monotonic() - started) * 1000)
        accel = self._accel.current()
        detail = f"{version}; accel={accel} ({self._accel.detail}); {len(self._vms)} VMs"
        return CheckResult("healthy", detail, (time.monotonic() - started) * 1000)

    async def close(self) -> None:
        for vm in list(self._vms.values()):
            if vm.monitor is not None:
                vm.monitor.cancel()
            vm.vmm.detach()
            await vm.qmp.close()
        self._vms.clear()
        await self._accel.close()

    @property
    def accel(self) -> AccelSelector:
        return self._accel
