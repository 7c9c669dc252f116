"""The Firecracker backend: one Firecracker process per VM, optionally jailed, driven over its REST API.

Lifecycle on top of what Firecracker offers: pause/resume are `PATCH /vm`; a graceful stop is
`SendCtrlAltDel` (x86 only; guests boot with `reboot=k`, so the guest's reboot ends Firecracker),
then SIGKILL after the timeout; a reboot is a stop followed by a new process with the same config
(Firecracker cannot restart a guest in place).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import platform
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from metald.backends import procfs
from metald.backends.firecracker import files, launch
from metald.backends.firecracker.api import ApiCall, FirecrackerApi
from metald.backends.firecracker.config import START, configure_calls
from metald.backends.firecracker.layout import API_SOCKET, FRESH_FILES, METRICS, VMM_LOG, Layout
from metald.backends.firecracker.metrics import MetricsReader
from metald.backends.vmm.console import ReadyWatch
from metald.backends.vmm.process import (
    CmdlineMatcher,
    VmmProcess,
    VmmStartError,
    exit_reason,
    read_exit,
    read_log_tail,
)
from metald.backends.vmm.sandbox import VmmUser, kvm_group
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

X86_TEMPLATES = ("T2", "T2S", "T2CL", "T2A")
ARM_TEMPLATES = ("V1N1",)
_KILL_WAIT = 10.0
_READY_POLL = 0.1
_VERSION_TIMEOUT = 5.0


def cpu_templates(machine: str) -> Mapping[str, str]:
    """Firecracker's static templates for this host's architecture, under their own names."""
    if machine in ("x86_64", "amd64"):
        return {name: name for name in X86_TEMPLATES}
    if machine in ("aarch64", "arm64"):
        return {name: name for name in ARM_TEMPLATES}
    return {}


@dataclass
class _Vm:
    """A Firecracker this backend started or re-adopted, until it ends or the backend closes."""

    spec: LaunchSpec
    layout: Layout
    vmm: VmmProcess
    api: FirecrackerApi
    ready: ReadyWatch
    metrics: MetricsReader
    paused: bool = False
    stopping: bool = False  # an end we asked for: the exit listener is not told
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)


class FirecrackerBackend:
    def __init__(
        self,
        *,
        firecracker_binary: str,
        jailer_binary: str = "",
        chroot_base: Path,
        vmm_uid: int | None,
        vmm_gid: int | None,
        cgroup_version: int = 2,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        start_timeout: float = 10.0,
        reboot_timeout: float = 30.0,
        machine: str | None = None,
    ) -> None:
        machine = machine or platform.machine()
        self.capabilities = BackendCapabilities(
            backend_type="firecracker",
            cpu_templates=cpu_templates(machine),
            console_types=frozenset({"SERIAL"}),  # no virtio-console device in Firecracker
            supports_initrd=True,
            supports_pause=True,
            supports_graceful_reboot=machine in ("x86_64", "amd64"),  # SendCtrlAltDel is x86-only
            max_vcpus=32,
        )
        self._firecracker = firecracker_binary
        self._jailer = jailer_binary
        self._chroot_base = chroot_base
        uid, gid = vmm_uid, vmm_gid
        if jailer_binary or vmm_uid is not None:  # the jailer needs both; default to the daemon's own
            uid = os.getuid() if vmm_uid is None else vmm_uid
            gid = os.getgid() if vmm_gid is None else vmm_gid
        self._uid, self._gid = uid, gid
        # Jailed, the jailer drops to uid/gid (and gives it the jail's /dev/kvm); unjailed, setpriv
        # does, with the group that may open /dev/kvm.
        self._user = (
            VmmUser(uid, gid).with_group(kvm_group())
            if uid is not None and gid is not None and not jailer_binary
            else None
        )
        launch.cgroup_limits(cgroup_version, 1, 0)  # refuses an unknown version now, not at first boot
        self._cgroup_version = cgroup_version
        self._cgroup_root = cgroup_root
        self._start_timeout = start_timeout
        self._reboot_timeout = reboot_timeout
        self._listener: ExitListener | None = None
        self._vms: dict[str, _Vm] = {}
        self._last_exit: dict[str, str] = {}

    def set_exit_listener(self, listener: ExitListener) -> None:
        self._listener = listener

    # ---- paths and commands ----------------------------------------------------------------

    def _binary(self, name: str) -> str:
        return shutil.which(name) or name

    def _layout(self, vm_id: str, vm_dir: Path) -> Layout:
        if not self._jailer:
            return Layout(vm_dir)
        fc_id = launch.firecracker_id(vm_id)
        return Layout(vm_dir, launch.jail_dir(self._chroot_base, self._firecracker, fc_id) / "root")

    def _argv(self, spec: LaunchSpec, layout: Layout) -> list[str]:
        fc_id = launch.firecracker_id(spec.vm_id)
        if not self._jailer:
            return launch.direct_argv(
                firecracker=self._binary(self._firecracker),
                fc_id=fc_id,
                api_sock=layout.api_socket_arg,
                netns=spec.netns,
                user=self._user,
            )
        assert self._uid is not None and self._gid is not None
        return launch.jailer_argv(
            jailer=self._binary(self._jailer),
            firecracker=self._binary(self._firecracker),
            fc_id=fc_id,
            api_sock=layout.api_socket_arg,
            uid=self._uid,
            gid=self._gid,
            chroot_base=self._chroot_base,
            netns=spec.netns,
            cgroup_version=self._cgroup_version,
            vcpu_count=spec.vcpu_count,
            memory_bytes=spec.memory_bytes,
        )

    # ---- files -------------------------------------------------------------------------------

    async def prepare(self, spec: LaunchSpec) -> None:
        layout = self._layout(spec.vm_id, spec.vm_dir)
        configure_calls(spec, layout, self.capabilities.cpu_templates)  # refuse before creating anything
        await asyncio.to_thread(layout.root.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(spec.vm_dir.mkdir, parents=True, exist_ok=True)
        for src, dst in layout.copies(spec):
            if not await asyncio.to_thread(dst.exists):
                await files.sparse_copy(src, dst)
                await asyncio.to_thread(files.chown, dst, self._uid, self._gid)

    async def _lay_out(self, spec: LaunchSpec, layout: Layout) -> None:
        """Before each start: links into the jail, empty output files, no stale socket."""
        for src, dst in layout.links(spec):
            await files.link_or_copy(src, dst)
        await asyncio.to_thread(self._fresh_files, spec, layout)

    def _fresh_files(self, spec: LaunchSpec, layout: Layout) -> None:
        files.chown(layout.root, self._uid, self._gid)  # Firecracker creates its socket there
        files.remove(layout.host(API_SOCKET))
        for name in FRESH_FILES:
            files.fresh_file(layout.host(name), self._uid, self._gid)
        files.fresh_file(layout.console_host(spec), self._uid, self._gid)
        if layout.jail_root is not None:
            shutil.rmtree(layout.jail_root / "dev", ignore_errors=True)  # the jailer mknods it again
            files.remove(spec.console_path)
            spec.console_path.symlink_to(layout.console_host(spec))

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self, spec: LaunchSpec) -> VmRuntime:
        current = self._vms.get(spec.vm_id)
        if current is not None:
            if current.vmm.running:
                return await self._runtime(current)
            current.stopping = True  # ended, its watcher not yet run: that end is superseded
            await self._forget(current)
        await self.prepare(spec)
        layout = self._layout(spec.vm_id, spec.vm_dir)
        calls = configure_calls(spec, layout, self.capabilities.cpu_templates)
        await self._lay_out(spec, layout)
        try:
            vmm = await VmmProcess.spawn(spec.vm_dir, self._argv(spec, layout), timeout=self._start_timeout)
        except VmmStartError as exc:
            raise MetaldError(
                ErrorCode.INTERNAL, f"Firecracker did not start: {exc}", reason="VMM_START_FAILED"
            ) from exc
        api = FirecrackerApi(layout.root, API_SOCKET)
        try:
            await api.wait_up(self._start_timeout, lambda: vmm.running)
            for call in [*calls, START]:
                await api.call(call)
        except BaseException as exc:
            vmm.kill()
            await self._wait_exit(vmm, _KILL_WAIT)
            await api.aclose()
            if isinstance(exc, MetaldError):
                tail = await asyncio.to_thread(self._log_tail, spec, layout)
                raise MetaldError(
                    exc.code, f"{exc.message}{tail}", reason=exc.reason, metadata=exc.metadata
                ) from exc
            raise
        vm = self._track(spec, layout, vmm, api, paused=False)
        return await self._runtime(vm)

    def _log_tail(self, spec: LaunchSpec, layout: Layout) -> str:
        """What Firecracker and its supervisor said, for an error message."""
        out = read_log_tail(spec.vm_dir)
        with contextlib.suppress(OSError):
            out += "\n" + layout.host(VMM_LOG).read_text(errors="replace")[-2000:]
        return f"; VMM output: {out.strip()}" if out.strip() else ""

    def _track(
        self, spec: LaunchSpec, layout: Layout, vmm: VmmProcess, api: FirecrackerApi, *, paused: bool
    ) -> _Vm:
        vm = _Vm(
            spec=spec,
            layout=layout,
            vmm=vmm,
            api=api,
            # Firecracker's console file is emptied at each start: this boot's output begins at 0.
            ready=ReadyWatch(layout.console_host(spec), spec.vm_id, 0),
            metrics=MetricsReader(layout.host(METRICS)),
            paused=paused,
        )
        self._vms[spec.vm_id] = vm
        vm.watcher = asyncio.create_task(self._watch(vm))
        return vm

    async def _watch(self, vm: _Vm) -> None:
        """Tell the listener of an end nobody asked for (guest poweroff or reboot, crash, kill)."""
        try:
            info = await asyncio.shield(vm.vmm.exited)
        except asyncio.CancelledError:  # detached (daemon shutdown) or forgotten
            return
        if vm.stopping:
            return
        await self._forget(vm)
        reason = exit_reason(info)  # Firecracker exits 0 when the guest reboots or powers off
        self._last_exit[vm.spec.vm_id] = reason
        log.info("Firecracker of %s ended by itself (%s)", vm.spec.vm_id, info)
        if self._listener is not None:
            try:
                await self._listener(vm.spec.vm_id, reason)
            except Exception:
                log.exception("exit listener failed for %s", vm.spec.vm_id)

    async def _forget(self, vm: _Vm) -> None:
        if self._vms.get(vm.spec.vm_id) is vm:
            del self._vms[vm.spec.vm_id]
        if vm.watcher is not None and vm.watcher is not asyncio.current_task():
            vm.watcher.cancel()
        await vm.api.aclose()

    @staticmethod
    async def _wait_exit(vmm: VmmProcess, timeout: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(vmm.exited), timeout)
        except TimeoutError:
            return False
        return True

    def _running(self, vm_id: str) -> _Vm:
        vm = self._vms.get(vm_id)
        if vm is None or not vm.vmm.running:
            raise MetaldError(
                ErrorCode.FAILED_PRECONDITION,
                f"the Firecracker of VM {vm_id} is not running",
                reason="VMM_NOT_RUNNING",
                metadata={"vm_id": vm_id},
            )
        return vm

    async def wait_ready(self, vm_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            vm = self._vms.get(vm_id)  # looked up each time: a reboot replaces it
            if vm is None:
                return False
            if await vm.ready.poll():
                return True
            if not vm.vmm.running or time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_READY_POLL)

    async def pause(self, vm_id: str) -> None:
        vm = self._running(vm_id)
        await vm.api.call(ApiCall("PATCH", "/vm", {"state": "Paused"}))
        vm.paused = True

    async def resume(self, vm_id: str) -> None:
        vm = self._running(vm_id)
        await vm.api.call(ApiCall("PATCH", "/vm", {"state": "Resumed"}))
        vm.paused = False

    async def reboot(self, vm_id: str, *, force: bool) -> None:
        spec = self._running(vm_id).spec
        await self.stop(vm_id, graceful=not force, timeout=self._reboot_timeout)
        await self.start(spec)

    async def stop(self, vm_id: str, *, graceful: bool, timeout: float) -> str:
        vm = self._vms.get(vm_id)
        if vm is None:
            return "not_running"
        vm.stopping = True
        reason = "killed" if vm.vmm.running else exit_reason(vm.vmm.exited.result())
        if graceful and vm.vmm.running and self.capabilities.supports_graceful_reboot:
            try:
                if vm.paused:  # a paused guest cannot take the key press
                    await vm.api.call(ApiCall("PATCH", "/vm", {"state": "Resumed"}))
                await vm.api.action("SendCtrlAltDel")
            except MetaldError as exc:
                log.warning("graceful stop of %s impossible, killing: %s", vm_id, exc.message)
            else:
                if await self._wait_exit(vm.vmm, timeout):
                    reason = "guest_poweroff"
        if vm.vmm.running:
            vm.vmm.kill()
            if not await self._wait_exit(vm.vmm, _KILL_WAIT):
                raise MetaldError(
                    ErrorCode.INTERNAL, f"the Firecracker of VM {vm_id} survived SIGKILL", reason="VMM_STUCK"
                )
        await self._forget(vm)
        return reason

    async def destroy(self, vm_id: str, vm_dir: Path) -> None:
        if vm_id in self._vms:
            await self.stop(vm_id, graceful=False, timeout=0)
        else:  # one left running by an earlier daemon and never re-adopted
            orphan = await VmmProcess.attach(vm_dir, self._matcher(vm_id))
            if orphan is not None:
                orphan.kill()
                await self._wait_exit(orphan, _KILL_WAIT)
        self._last_exit.pop(vm_id, None)
        await asyncio.to_thread(self._remove_files, vm_id, vm_dir)

    def _remove_files(self, vm_id: str, vm_dir: Path) -> None:
        shutil.rmtree(vm_dir, ignore_errors=True)
        if self._jailer:
            fc_id = launch.firecracker_id(vm_id)
            shutil.rmtree(launch.jail_dir(self._chroot_base, self._firecracker, fc_id), ignore_errors=True)
            for cgroup in launch.cgroup_dirs(
                self._cgroup_root, self._cgroup_version, self._firecracker, fc_id
            ):
                with contextlib.suppress(OSError):
                    cgroup.rmdir()

    async def adopt(self, spec: LaunchSpec) -> VmRuntime | None:
        current = self._vms.get(spec.vm_id)
        if current is not None and current.vmm.running:
            return await self._runtime(current)
        vmm = await VmmProcess.attach(spec.vm_dir, self._matcher(spec.vm_id))
        if vmm is None:  # ended while no daemon watched: keep why, for last_exit_reason()
            if (info := await asyncio.to_thread(read_exit, spec.vm_dir)) is not None:
                self._last_exit[spec.vm_id] = exit_reason(info)
            return None
        layout = self._layout(spec.vm_id, spec.vm_dir)
        api = FirecrackerApi(layout.root, API_SOCKET)
        try:
            state = await api.instance_state()
        except MetaldError:
            state = ""
        if state not in ("Running", "Paused"):
            # Never started (the daemon died while configuring it) or deaf: not a usable VM.
            log.warning("Firecracker of %s is in state %r: killing it", spec.vm_id, state)
            vmm.kill()
            await self._wait_exit(vmm, _KILL_WAIT)
            await api.aclose()
            return None
        vm = self._track(spec, layout, vmm, api, paused=state == "Paused")
        return await self._runtime(vm)

    # ---- observation -------------------------------------------------------------------------

    async def _runtime(self, vm: _Vm) -> VmRuntime:
        extra = {"firecracker_id": launch.firecracker_id(vm.spec.vm_id)}
        if vm.layout.jail_root is not None:
            extra["jail_root"] = str(vm.layout.jail_root)
        return VmRuntime(
            pid=vm.vmm.pid,
            socket_path=str(vm.layout.host(API_SOCKET)),
            guest_ready=await vm.ready.poll(),
            paused=vm.paused,
            extra=extra,
        )

    @staticmethod
    def _matcher(vm_id: str) -> CmdlineMatcher:
        """Recognises this VM's Firecracker by its `--id` (the jailer execs it in place: same pid)."""
        return functools.partial(launch.is_firecracker_of, fc_id=launch.firecracker_id(vm_id))

    def last_exit_reason(self, vm_id: str) -> str | None:
        return self._last_exit.get(vm_id)

    async def snapshot(self, vm_id: str, dest: Path) -> SnapshotResult:
        raise MetaldError(
            ErrorCode.FAILED_PRECONDITION,
            "the firecracker backend does not take snapshots on this host yet",
            reason="SNAPSHOT_UNSUPPORTED",
            metadata={"vm_id": vm_id},
        )

    async def runtime(self, vm_id: str) -> VmRuntime | None:
        vm = self._vms.get(vm_id)
        if vm is None or not vm.vmm.running:
            return None
        return await self._runtime(vm)

    async def metrics(self, vm_id: str) -> VmMetrics:
        vm = self._vms.get(vm_id)
        if vm is None or not vm.vmm.running:
            return VmMetrics()
        with contextlib.suppress(MetaldError):
            await vm.api.action("FlushMetrics")
        totals = await vm.metrics.read()
        stat = procfs.read_stat(vm.vmm.pid)
        return VmMetrics(
            cpu_time_nanos=stat.cpu_time_nanos if stat else 0,
            memory_usage_bytes=procfs.read_rss_bytes(vm.vmm.pid),
            disk_read_bytes=totals.disk_read_bytes,
            disk_write_bytes=totals.disk_write_bytes,
            network_rx_bytes=totals.network_rx_bytes,
            network_tx_bytes=totals.network_tx_bytes,
        )

    async def ping(self) -> CheckResult:
        """Healthy when Firecracker (and the jailer, if configured) run `--version`."""
        started = time.monotonic()
        versions = []
        for binary in filter(None, (self._firecracker, self._jailer)):
            ok, detail = await _version(binary)
            if not ok:
                return CheckResult("unhealthy", detail, (time.monotonic() - started) * 1000)
            versions.append(detail)
        return CheckResult("healthy", "; ".join(versions), (time.monotonic() - started) * 1000)

    async def close(self) -> None:
        """Detach from every Firecracker, leaving them running for the next daemon to adopt."""
        for vm in list(self._vms.values()):
            if vm.watcher is not None:
                vm.watcher.cancel()
            vm.vmm.detach()
            await vm.api.aclose()
        self._vms.clear()


async def _version(binary: str) -> tuple[bool, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            binary,
            "--version",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        return False, f"{binary}: {exc.strerror or exc}"
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), _VERSION_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False, f"{binary} --version did not answer within {_VERSION_TIMEOUT:g}s"
    first = next(iter(out.decode(errors="replace").strip().splitlines()), "")
    if proc.returncode != 0:
        return False, f"{binary} --version failed (rc {proc.returncode}): {first}"
    return True, first or binary
