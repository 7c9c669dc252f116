"""The Firecracker backend: one Firecracker process per VM, optionally jailed, driven over its REST API.

Lifecycle on top of what Firecracker offers: pause/resume are `PATCH /vm`; a graceful stop is
`SendCtrlAltDel` (x86 only; guests boot with `reboot=k`, so the guest's reboot ends Firecracker),
then SIGKILL after the timeout; a reboot is a stop followed by a new process with the same config
(Firecracker cannot restart a guest in place). Snapshots and clones: snapshot.py (jailed only).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import platform
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from metald.backends.firecracker import assets, files, launch, snapshot
from metald.backends.firecracker.api import ApiCall, FirecrackerApi
from metald.backends.firecracker.config import START, configure_calls, cpu_templates, output_calls
from metald.backends.firecracker.layout import API_SOCKET, METRICS, VMM_LOG, Layout
from metald.backends.firecracker.metrics import MetricsReader
from metald.backends.vmm import kit
from metald.domain.errors import MetaldError, internal, snapshot_invalid, snapshot_unsupported

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Api:
    """One VM's Firecracker API connection, with what a restart or a metrics read needs."""

    api: FirecrackerApi
    spec: kit.LaunchSpec
    layout: Layout
    metrics: MetricsReader

    async def close(self) -> None:
        await self.api.aclose()


class FirecrackerBackend(kit.VmmBackend[Api]):
    """Firecracker's own part: the launch (argv, jail layout, configuring API calls) and the REST
    control channel; the lifecycle around them (registry, exits, re-adoption, cgroups) is
    vmm/lifecycle.py. Unjailed, each Firecracker gets a cgroup of `cgroups` with the same limits as
    a QEMU; jailed, the jailer makes it (launch.jailer_argv)."""

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
        cgroups: kit.Cgroups | None = None,
        start_timeout: float = 10.0,
        reboot_timeout: float = 30.0,
        machine: str | None = None,
    ) -> None:
        machine = machine or platform.machine()
        self.capabilities = kit.BackendCapabilities(
            backend_type="firecracker",
            cpu_templates=cpu_templates(machine),
            console_types=frozenset({"SERIAL"}),  # no virtio-console device in Firecracker
            supports_initrd=True,
            supports_pause=True,
            supports_graceful_reboot=machine in ("x86_64", "amd64"),  # SendCtrlAltDel is x86-only
            supports_snapshots=bool(jailer_binary),  # the drives' recorded paths: snapshot.py
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
            kit.VmmUser(uid, gid).with_group(kit.kvm_group())
            if uid is not None and gid is not None and not jailer_binary
            else None
        )
        launch.cgroup_limits(cgroup_version, 1, 0)  # refuses an unknown version now, not at first boot
        self._cgroup_version = cgroup_version
        self._cgroup_root = cgroup_root
        self._start_timeout = start_timeout
        self._reboot_timeout = reboot_timeout
        self._vms: kit.VmmLifecycle[Api] = kit.VmmLifecycle(
            "Firecracker", runtime_files=(API_SOCKET,), cgroups=None if jailer_binary else cgroups
        )

    # ---- paths and commands ----------------------------------------------------------------

    def _binary(self, name: str) -> str:
        return shutil.which(name) or name

    def _layout(self, vm_id: str, vm_dir: Path) -> Layout:
        if not self._jailer:
            return Layout(vm_dir)
        fc_id = launch.firecracker_id(vm_id)
        return Layout(vm_dir, launch.jail_dir(self._chroot_base, self._firecracker, fc_id) / "root")

    def _argv(self, spec: kit.LaunchSpec, layout: Layout) -> list[str]:
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

    @staticmethod
    def _matcher(vm_id: str) -> kit.CmdlineMatcher:
        """Recognises this VM's Firecracker by its `--id` (the jailer execs it in place: same pid)."""
        return functools.partial(launch.is_firecracker_of, fc_id=launch.firecracker_id(vm_id))

    # ---- files -------------------------------------------------------------------------------

    async def prepare(self, spec: kit.LaunchSpec) -> None:
        layout = self._layout(spec.vm_id, spec.vm_dir)
        configure_calls(spec, layout, self.capabilities.cpu_templates)  # refuse before creating anything
        copies = [c for c in snapshot.disk_sources(spec, layout) if not await asyncio.to_thread(c[1].exists)]
        async with assets.opened(spec, [src for src, _ in copies]) as sources:
            await asyncio.to_thread(layout.root.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(spec.vm_dir.mkdir, parents=True, exist_ok=True)
            for src, dst in copies:
                await files.sparse_copy(assets.host_source(sources[src]), dst)
                await asyncio.to_thread(files.chown, dst, self._uid, self._gid)

    async def _lay_out(self, spec: kit.LaunchSpec, layout: Layout, handed: Mapping[Path, int]) -> bool:
        """Before each start: links into the jail, empty output files, no stale socket; a clone's
        snapshot files. Whether the guest is restored up (it prints no new ready line)."""
        for src, dst in layout.links(spec):
            await files.place(handed[src], dst)
        await asyncio.to_thread(files.fresh_layout, spec, layout, self._uid, self._gid)
        if spec.restore_from is None:
            await asyncio.to_thread(snapshot.forget_restore, layout)
            return False
        return await snapshot.lay_out_restore(spec.restore_from, layout, self._uid, self._gid)

    async def destroy(self, vm_id: str, vm_dir: Path) -> None:
        await self._vms.kill_orphan(vm_id, vm_dir, self._matcher(vm_id))
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

    # ---- starting and re-adopting ------------------------------------------------------------

    async def start(self, spec: kit.LaunchSpec) -> kit.VmRuntime:
        if (vm := self._vms.find(spec.vm_id)) is not None:
            return await self._runtime(vm)
        await self._vms.supersede(spec.vm_id)
        async with assets.opened(spec, assets.handed(spec, jailed=bool(self._jailer))) as handed:
            vmm, layout, restored_ready = await self._spawn(spec, handed)
        control = Api(
            FirecrackerApi(layout.root, API_SOCKET), spec, layout, MetricsReader(layout.host(METRICS))
        )
        calls = [*configure_calls(spec, layout, self.capabilities.cpu_templates), START]
        if spec.restore_from is not None:  # a fresh Firecracker: outputs, then the snapshot
            calls = [*output_calls(layout), snapshot.load_call(spec, layout)]
        try:
            await control.api.wait_up(self._start_timeout, lambda: vmm.running)
            for call in calls:
                await control.api.call(call)
        except BaseException as exc:
            await self._vms.kill_untracked(vmm)
            await control.close()
            if isinstance(exc, MetaldError):
                tail = await asyncio.to_thread(self._log_tail, spec, layout)
                raise exc.extended(tail) from exc
            raise
        return await self._runtime(self._track(vmm, control, ready=restored_ready))

    async def _spawn(
        self, spec: kit.LaunchSpec, handed: Mapping[Path, int]
    ) -> tuple[kit.VmmProcess, Layout, bool]:
        """Prepare, lay out and start the VMM with the assets open; unjailed, it inherits them.
        (The process, its layout, whether the guest is restored up.)"""
        await self.prepare(spec)
        layout = self._layout(spec.vm_id, spec.vm_dir)
        if not self._jailer:
            layout = replace(layout, inherited=handed)
        try:
            restored_ready = await self._lay_out(spec, layout, handed)
        except OSError as exc:
            raise snapshot_invalid(f"cannot lay out the snapshot: {exc}") from exc
        try:
            cgroup = await self._vms.create_cgroup(spec)
            vmm = await kit.VmmProcess.spawn(
                spec.vm_dir,
                self._argv(spec, layout),
                timeout=self._start_timeout,
                pass_fds=tuple(layout.inherited.values()),
                cgroup=cgroup,
            )
        except kit.VmmStartError as exc:
            if not await asyncio.to_thread(shutil.which, self._jailer or self._firecracker):
                raise kit.tool_missing(self._jailer or self._firecracker, exc) from exc
            raise internal("VMM_START_FAILED", f"Firecracker did not start: {exc}") from exc
        return vmm, layout, restored_ready

    def _log_tail(self, spec: kit.LaunchSpec, layout: Layout) -> str:
        """What Firecracker and its supervisor said, for an error message."""
        out = kit.read_log_tail(spec.vm_dir)
        with contextlib.suppress(OSError):
            out += "\n" + layout.host(VMM_LOG).read_text(errors="replace")[-2000:]
        return f"; VMM output: {out.strip()}" if out.strip() else ""

    def _track(
        self, vmm: kit.VmmProcess, control: Api, *, paused: bool = False, ready: bool
    ) -> kit.RunningVm[Api]:
        spec = control.spec
        # Firecracker's console file is emptied at each start: this boot's output begins at 0. A
        # restored guest that was up prints no new ready line.
        watch = kit.ReadyWatch(control.layout.console_host(spec), spec.vm_id, 0)
        watch.ready = ready
        vm = self._vms.track(spec.vm_id, spec.vm_dir, vmm, control, watch)
        vm.paused = paused
        return vm

    async def adopt(self, spec: kit.LaunchSpec) -> kit.VmRuntime | None:
        if (vm := self._vms.find(spec.vm_id)) is not None:
            return await self._runtime(vm)
        vmm = await self._vms.attach(spec, self._matcher(spec.vm_id))
        if vmm is None:
            return None
        layout = self._layout(spec.vm_id, spec.vm_dir)
        control = Api(
            FirecrackerApi(layout.root, API_SOCKET), spec, layout, MetricsReader(layout.host(METRICS))
        )
        try:
            state = await control.api.instance_state()
        except MetaldError:
            state = ""
        if state not in ("Running", "Paused"):
            # Never started (the daemon died while configuring it) or deaf: not a usable VM.
            log.warning("Firecracker of %s is in state %r: killing it", spec.vm_id, state)
            await self._vms.kill_untracked(vmm)
            await control.close()
            return None
        ready = await asyncio.to_thread(snapshot.readopted, layout)
        return await self._runtime(self._track(vmm, control, paused=state == "Paused", ready=ready))

    # ---- lifecycle ---------------------------------------------------------------------------

    async def pause(self, vm_id: str) -> None:
        vm = self._vms.get(vm_id)
        await vm.control.api.call(ApiCall("PATCH", "/vm", {"state": "Paused"}))
        vm.paused = True

    async def resume(self, vm_id: str) -> None:
        vm = self._vms.get(vm_id)
        await vm.control.api.call(ApiCall("PATCH", "/vm", {"state": "Resumed"}))
        vm.paused = False

    async def reboot(self, vm_id: str, *, force: bool) -> None:
        """Firecracker cannot restart a guest in place: a stop (graceful unless `force`, and never
        graceful before the guest is up: it would miss the key press), then a new process."""
        vm = self._vms.get(vm_id)
        graceful = not force and await vm.watch.poll()
        await self.stop(vm_id, graceful=graceful, timeout=self._reboot_timeout)
        await self.start(replace(vm.control.spec, restore_from=None))  # a clone reboots cold

    async def stop(self, vm_id: str, *, graceful: bool, timeout: float) -> str:
        async def politely(vm: kit.RunningVm[Api]) -> str | None:
            try:
                if vm.paused:  # a paused guest cannot take the key press
                    await vm.control.api.call(ApiCall("PATCH", "/vm", {"state": "Resumed"}))
                await vm.control.api.action("SendCtrlAltDel")
            except MetaldError as exc:
                log.warning("graceful stop of %s impossible, killing: %s", vm_id, exc.message)
                return None
            return "guest_poweroff" if await self._vms.ended(vm, timeout) else None

        can_ask = graceful and self.capabilities.supports_graceful_reboot
        return await self._vms.stop(vm_id, politely if can_ask else None)

    # ---- observation -------------------------------------------------------------------------

    async def _runtime(self, vm: kit.RunningVm[Api]) -> kit.VmRuntime:
        extra = {"firecracker_id": launch.firecracker_id(vm.vm_id)}
        if vm.control.layout.jail_root is not None:
            extra["jail_root"] = str(vm.control.layout.jail_root)
        return kit.VmRuntime(
            pid=vm.vmm.pid,
            socket_path=str(vm.control.layout.host(API_SOCKET)),
            guest_ready=await vm.watch.poll(),
            paused=vm.paused,
            extra=extra,
        )

    async def snapshot(self, vm_id: str, dest: Path) -> kit.SnapshotResult:
        if not self.capabilities.supports_snapshots:
            raise snapshot_unsupported(
                vm_id, "an unjailed Firecracker takes no snapshots (set jailer_binary)"
            )
        vm = self._vms.get(vm_id)
        c = vm.control
        running = await c.api.instance_state() == "Running"
        ready = await vm.watch.poll()
        return await snapshot.take(c.api, c.spec, c.layout, dest, running=running, guest_ready=ready)

    async def metrics(self, vm_id: str) -> kit.VmMetrics:
        vm = self._vms.find(vm_id)
        if vm is None:
            return kit.VmMetrics()
        with contextlib.suppress(MetaldError):
            await vm.control.api.action("FlushMetrics")
        totals = await vm.control.metrics.read()
        cpu, rss = self._vms.process_usage(vm)
        return kit.VmMetrics(
            cpu_time_nanos=cpu,
            memory_usage_bytes=rss,
            disk_read_bytes=totals.disk_read_bytes,
            disk_write_bytes=totals.disk_write_bytes,
            network_rx_bytes=totals.network_rx_bytes,
            network_tx_bytes=totals.network_tx_bytes,
        )

    async def ping(self) -> kit.CheckResult:
        """Healthy when Firecracker (and the jailer, if configured) run `--version`."""
        versions = []
        for binary in filter(None, (self._firecracker, self._jailer)):
            ok, detail = await kit.tool_version(binary)
            if not ok:
                return kit.CheckResult("unhealthy", detail)
            versions.append(detail)
        return kit.CheckResult("healthy", "; ".join(versions))

    async def close(self) -> None:
        """Detach from every Firecracker, leaving them running for the next daemon to adopt."""
        await self._vms.close()
