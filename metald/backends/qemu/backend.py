"""QemuBackend: metald.ports.Backend on QEMU microvm, one supervised QEMU process per VM.

What is QEMU's own here: the launch (files.py, cmdline.py) and the control channel (QMP); the
lifecycle around them (registry, exits, re-adoption, cgroups) is vmm/lifecycle.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
from pathlib import Path

from metald.backends.qemu import control as qemu_control
from metald.backends.qemu import layout, snapshot
from metald.backends.qemu.accel import AccelSelector, ProbeAssets, host_tsc_khz, qemu_version
from metald.backends.qemu.agent import GuestAgent
from metald.backends.qemu.cmdline import CPU_TEMPLATES, HostOptions, launch_cpu_model, name_matches, qemu_argv
from metald.backends.qemu.control import Qmp, save_boot_state, write_boot_state
from metald.backends.qemu.files import RamFile, VmmFileError, close_fds, log_paths, open_vmm_files
from metald.backends.qemu.overlay import prepare_vm_dir
from metald.backends.qemu.pool import Launched, PoolSlots
from metald.backends.qemu.qmp import QmpClient, QmpClosedError, QmpError
from metald.backends.vmm import kit
from metald.domain.errors import MetaldError, invalid

log = logging.getLogger(__name__)

_CTRL_ALT_DEL = ("ctrl", "alt", "delete")
QMP_CONNECT_TIMEOUT = 10.0
AGENT_PING_TIMEOUT = 1.5  # the agent polls its port once a second while nobody is connected
QUIT_TIMEOUT = 5.0
CONSOLE_LOG_MAX_BYTES = 4 << 20  # console.log + console.log.1 together, the newest output


class QemuBackend(kit.VmmBackend[Qmp]):
    """Runs each VM as `qemu-system-x86_64 -M microvm` under a per-VM supervisor (vmm/supervisor.py).

        The daemon never is QEMU's parent: VMs survive a daemon restart and are re-adopted with adopt().
        An exit that stop() did not cause goes to the exit listener as "guest_poweroff" (the guest
        powered off), "oom_killed" (QEMU outgrew its cgroup's memory limit) or "vmm_crashed".

        Sandbox: QEMU runs as `vmm_user` (None: the daemon's own user) with seccomp (`-sandbox on`), in
        its own cgroup of `cgroups` (None: no limits) with the limits of vmm/cgroups.py, and opens no
        host file itself (files.py). `memory_overhead` is the cgroup's memory allowance above guest RAM.
    The console (and serial) log keep the newest `console_log_max_bytes` of output (vmm/relay.py).
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
        vmm_user: kit.VmmUser | None = None,
        cgroups: kit.Cgroups | None = None,
        memory_overhead: int = kit.VMM_MEMORY_OVERHEAD,
        ram_dir: Path | None = None,
        console_log_max_bytes: int = CONSOLE_LOG_MAX_BYTES,
    ) -> None:
        self._binary = qemu_binary
        self._console_max = console_log_max_bytes
        self._img_binary = qemu_img_binary
        self._user = vmm_user
        # Under KVM the VMM also needs /dev/kvm, through the group that may open it.
        self._kvm_user = vmm_user.with_group(kit.kvm_group()) if vmm_user is not None else None
        self._tsc_khz = host_tsc_khz()
        # Guest RAM in files of ram_dir (tmpfs) makes VMs snapshottable; None: anonymous memory.
        self._ram = RamFile(ram_dir, vmm_user.uid if vmm_user else None) if ram_dir else None
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
        self._vms: kit.VmmLifecycle[Qmp] = kit.VmmLifecycle(
            "QEMU", runtime_files=layout.RUNTIME_FILES, cgroups=cgroups, memory_overhead=memory_overhead
        )
        self.capabilities = kit.BackendCapabilities(
            backend_type="qemu",
            cpu_templates=dict(CPU_TEMPLATES),
            console_types=frozenset({"SERIAL", "VIRTIO_CONSOLE"}),
            supports_snapshots=self._ram is not None,
            supports_warm_pool=self._ram is not None,
        )
        self._pool = PoolSlots(self._launch, self.start, self._vms)

    # ---- files ------------------------------------------------------------------------------

    async def prepare(self, spec: kit.LaunchSpec) -> None:
        await prepare_vm_dir(spec, qemu_img=self._img_binary)

    async def destroy(self, vm_id: str, vm_dir: Path) -> None:
        await self._vms.kill_orphan(vm_id, vm_dir, await self._matcher(vm_id, vm_dir))
        await asyncio.to_thread(shutil.rmtree, vm_dir, True)

    # ---- starting and re-adopting ------------------------------------------------------------

    async def start(self, spec: kit.LaunchSpec) -> kit.VmRuntime:
        if (runtime := await self.adopt(spec)) is not None:
            return runtime  # already running (e.g. a retried BootVm): never a second QEMU
        await self._vms.supersede(spec.vm_id)
        launched = await self._pool.take(spec) if spec.pool_slot is not None else None
        if launched is None:
            launched = await self._launch(spec)
        control, vmm = launched.control, launched.vmm
        watch = kit.ReadyWatch(spec.console_path, spec.vm_id, launched.console_offset)
        vm = control.vm = self._vms.track(spec.vm_id, spec.vm_dir, vmm, control, watch)
        if launched.incoming is not None and spec.restore_from is not None:
            await self._restore(vm, launched.incoming, spec.restore_from)
        await asyncio.to_thread(write_boot_state, vm.vm_dir, watch.offset, control)
        log.info(
            "vm %s: qemu pid %d started (%s, cpu %s)", spec.vm_id, vmm.pid, control.accel, control.cpu_model
        )
        return await self._runtime(vm)

    async def _launch(self, spec: kit.LaunchSpec) -> Launched:
        """A new QEMU for `spec`, its QMP connected; not tracked yet (a warm pool slot never is)."""
        accel = self._accel.current()
        try:
            model = launch_cpu_model(spec, accel)
        except KeyError:  # a hand-built spec: the service refuses unknown templates at create
            raise invalid(
                "config.cpu.cpu_template", f"{spec.cpu_template!r} is not offered by QEMU"
            ) from None
        await self.prepare(spec)
        host = HostOptions(binary=self._binary, accel=accel, tsc_khz=self._tsc_khz)
        user = self._kvm_user if accel == "kvm" else self._user
        offset = await asyncio.to_thread(kit.file_size, spec.console_path)
        try:
            fds = await asyncio.to_thread(open_vmm_files, spec, self._ram)
        except VmmFileError as e:
            raise kit.vmm_failed(spec.vm_id, str(e)) from e
        try:
            cgroup = await self._vms.create_cgroup(spec)
            argv = kit.wrap_argv(qemu_argv(spec, host, fds), netns=spec.netns, user=user)
            relays = [
                kit.Relay(fd, path, self._console_max)
                for fd, path in zip(fds.log_sources, log_paths(spec), strict=True)
            ]
            vmm = await kit.VmmProcess.spawn(
                spec.vm_dir, argv, pass_fds=fds.all(), cgroup=cgroup, relays=relays
            )
        except FileNotFoundError as e:
            raise kit.tool_missing(self._binary, e) from e
        except kit.VmmStartError as e:
            if await self._binary_missing():
                raise kit.tool_missing(self._binary, e) from e
            # With the launcher, a QEMU that refuses its kernel exits before the supervisor is up.
            raise qemu_control.did_not_come_up(spec.vm_id, e.tail) from e
        finally:
            close_fds(fds)
        control = Qmp(accel, model, ram_fd=fds.ram)
        try:
            connected = await self._connect(spec.vm_dir, vmm, control)
        except BaseException:  # cancelled: no QEMU may run untracked
            vmm.kill()
            vmm.detach()
            raise
        if not connected:
            if await self._binary_missing():  # the sandbox wrapper ran, but QEMU is not there
                raise kit.tool_missing(self._binary)
            raise qemu_control.did_not_come_up(
                spec.vm_id, await asyncio.to_thread(kit.read_log_tail, spec.vm_dir, vmm.log_offset)
            )
        return Launched(vmm, control, fds.incoming, offset)

    async def _binary_missing(self) -> bool:
        return not await asyncio.to_thread(shutil.which, self._binary)

    async def adopt(self, spec: kit.LaunchSpec) -> kit.VmRuntime | None:
        if (vm := self._vms.find(spec.vm_id)) is not None:
            return await self._runtime(vm)
        vmm = await self._vms.attach(spec, await self._matcher(spec.vm_id, spec.vm_dir))
        if vmm is None:
            return None
        boot = await asyncio.to_thread(kit.read_json, spec.vm_dir / layout.BOOT_STATE) or {}
        watch = kit.ReadyWatch(spec.console_path, spec.vm_id, int(boot.get("console_offset", 0)))
        ram_fd = boot.get("ram_fd")
        control = Qmp(
            str(boot.get("accel", "tcg")),
            str(boot.get("cpu_model", "unknown")),
            ram_fd=ram_fd if isinstance(ram_fd, int) else None,
            restored_ready=bool(boot.get("restored_ready")),
            vmm_name=boot.get("vmm_name") if isinstance(boot.get("vmm_name"), str) else None,
        )
        if control.vmm_name:
            self._pool.mark_pool_born(control, spec)
        watch.ready = control.restored_ready
        if not await self._connect(spec.vm_dir, vmm, control):
            return None
        if await qemu_control.awaiting_restore(
            control
        ):  # a restore cut short: that QEMU holds no machine yet
            await control.close()
            await self._vms.kill_untracked(vmm)
            return None
        control.vm = self._vms.track(spec.vm_id, spec.vm_dir, vmm, control, watch)
        log.info("vm %s: re-adopted qemu pid %d", spec.vm_id, vmm.pid)
        return await self._runtime(control.vm)

    @staticmethod
    async def _matcher(vm_id: str, vm_dir: Path) -> kit.CmdlineMatcher:
        """How the VM's QEMU is recognised: by its -name, the VM's id or its warm pool slot's."""
        name = await asyncio.to_thread(qemu_control.recorded_vmm_name, vm_dir) or vm_id
        return functools.partial(name_matches, vm_id=name)

    async def _connect(self, vm_dir: Path, vmm: kit.VmmProcess, control: Qmp) -> bool:
        """Connect QMP; a VMM that cannot be controlled is killed (False)."""
        try:
            control.client = await QmpClient.connect(
                vm_dir,
                layout.QMP_SOCKET,
                timeout=QMP_CONNECT_TIMEOUT,
                on_event=control.on_event,
                alive=lambda: vmm.running,
            )
        except (OSError, QmpError, TimeoutError, ValueError):
            await self._vms.kill_untracked(vmm)
            return False
        return True

    # ---- warm pool slots (pool.py) ----------------------------------------------------------
    async def start_pool_slot(self, spec: kit.LaunchSpec) -> None:
        await self._pool.start(spec)

    def pool_slot_running(self, slot_dir: Path) -> bool:
        return self._pool.running(slot_dir)

    async def stop_pool_slot(self, slot_dir: Path) -> None:
        await self._pool.stop(slot_dir)

    # ---- snapshots (snapshot.py) ----------------------------------------------------------------
    async def _restore(self, vm: kit.RunningVm[Qmp], state_fd: int, snapshot_dir: Path) -> None:
        """Load a clone's device state (a VMM that cannot be restored is killed); a snapshot of a
        guest that was up is up at once (no new ready line). The snapshot's manifest is read in a
        thread while QEMU loads the state: that read is off a clone's clock."""
        assert vm.control.client is not None
        was_ready = asyncio.ensure_future(asyncio.to_thread(snapshot.source_was_ready, snapshot_dir))
        try:
            await snapshot.restore(vm.control.client, state_fd)
        except (snapshot.SnapshotError, QmpError, QmpClosedError, TimeoutError) as e:
            await asyncio.wait([was_ready])  # a read that cannot fail: source_was_ready is lenient
            await self.stop(vm.vm_id, graceful=False, timeout=0)
            raise kit.vmm_failed(vm.vm_id, f"cannot restore the snapshot: {e}") from e
        except BaseException:
            was_ready.cancel()
            raise
        vm.control.restored_ready = vm.watch.ready = await was_ready

    async def snapshot(self, vm_id: str, dest: Path) -> kit.SnapshotResult:
        return await snapshot.take_vm(
            self._vms.get(vm_id), dest, ram_owner=self._ram.owner if self._ram else None
        )

    # ---- lifecycle ----------------------------------------------------------------------------

    async def pause(self, vm_id: str) -> None:
        await self._vms.get(vm_id).control.execute("stop")

    async def resume(self, vm_id: str) -> None:
        await self._vms.get(vm_id).control.execute("cont")

    async def reboot(self, vm_id: str, *, force: bool) -> None:
        """force, or a guest not up yet (it would miss any request): system_reset. Graceful: the
        guest agent's `reboot` if it answers a ping quickly, else Ctrl-Alt-Del on the i8042
        keyboard (the default guest's init reboots on it). Born in a pool slot: see pool.py."""
        vm = self._vms.get(vm_id)
        if vm.control.reset_elsewhere is not None:
            return await vm.control.reset_elsewhere()
        up = await vm.watch.poll()
        await self._new_boot(vm)
        if force or not up:
            await vm.control.execute("system_reset")
        elif not await self._agent_command(vm, "reboot"):
            keys = [{"type": "qcode", "data": k} for k in _CTRL_ALT_DEL]
            await vm.control.execute("send-key", {"keys": keys})

    @staticmethod
    async def _new_boot(vm: kit.RunningVm[Qmp]) -> None:
        """The guest is about to boot again: watch for its ready line from the console's end."""
        vm.watch.restart()
        await save_boot_state(vm)

    @staticmethod
    async def _agent_command(vm: kit.RunningVm[Qmp], command: str) -> bool:
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

        async def politely(vm: kit.RunningVm[Qmp]) -> str | None:
            with contextlib.suppress(MetaldError):
                if await vm.watch.poll():  # else the power button would be lost: quit at once
                    if await vm.control.status() == "paused":
                        await vm.control.execute("cont")
                    await vm.control.execute("system_powerdown")
                    if await self._vms.ended(vm, timeout):
                        return "guest_poweroff"
            with contextlib.suppress(MetaldError):
                await vm.control.execute("quit")
            return "quit" if await self._vms.ended(vm, QUIT_TIMEOUT) else None

        return await self._vms.stop(vm_id, politely if graceful else None)

    # ---- observing ----------------------------------------------------------------------------

    async def _runtime(self, vm: kit.RunningVm[Qmp]) -> kit.VmRuntime:
        status = ""
        with contextlib.suppress(MetaldError):
            status = await vm.control.status(timeout=2.0)
        return kit.VmRuntime(
            pid=vm.vmm.pid,
            socket_path=str(vm.vm_dir / layout.QMP_SOCKET),
            guest_ready=await vm.watch.poll(),
            paused=status == "paused",
            extra={"accelerator": vm.control.accel, "cpu_model": vm.control.cpu_model}
            | ({"warm_pool_slot": vm.control.vmm_name} if vm.control.vmm_name else {}),
        )

    async def metrics(self, vm_id: str) -> kit.VmMetrics:
        vm = self._vms.find(vm_id)
        if vm is None:
            return kit.VmMetrics()
        read = written = 0
        with contextlib.suppress(MetaldError):
            for device in await vm.control.execute("query-blockstats", timeout=2.0):
                read += int(device["stats"]["rd_bytes"])
                written += int(device["stats"]["wr_bytes"])
        cpu, rss = self._vms.process_usage(vm)
        return kit.VmMetrics(
            cpu_time_nanos=cpu, memory_usage_bytes=rss, disk_read_bytes=read, disk_write_bytes=written
        )

    async def ping(self) -> kit.CheckResult:
        try:
            version = await qemu_version(self._binary)
        except OSError as e:
            return kit.CheckResult("unhealthy", f"{self._binary}: {e}")
        if not await asyncio.to_thread(shutil.which, self._img_binary):
            detail = f"{self._img_binary} not found: VM disks cannot be made"
            return kit.CheckResult("unhealthy", detail)
        accel = self._accel.current()
        detail = f"{version}; accel={accel} ({self._accel.detail}); {len(self._vms)} VMs, {len(self._pool)} pool slots"
        return kit.CheckResult("healthy", detail)

    async def close(self) -> None:
        await self._pool.close()
        await self._vms.close()
        await self._accel.close()

    @property
    def accel(self) -> AccelSelector:
        return self._accel
