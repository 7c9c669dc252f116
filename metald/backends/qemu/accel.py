"""Choosing the accelerator: KVM where it really works, TCG otherwise.

An openable /dev/kvm is not proof: on nested setups such as PVM, guests crawl and then die with
"KVM internal error ... emulation failure". So "auto" boots the probe guest once under KVM and
requires its ready line within a few seconds. The verdict is cached in state_dir, keyed by the QEMU
version, the host kernel and the probe kernel's mtime. Until the probe concludes, VMs start on TCG.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from metald.backends.qemu.cmdline import HostOptions, qemu_argv
from metald.backends.qemu.files import close_fds, open_vmm_files
from metald.backends.vmm.console import ReadyWatch
from metald.backends.vmm.layout import VMM_LOG
from metald.backends.vmm.sandbox import VmmUser, wrap_argv
from metald.backends.vmm.tools import tool_version
from metald.ports import DiskSpec, LaunchSpec

PROBE_TIMEOUT = 8.0
PROBE_VM_ID = "metald-accel-probe"
_KVM_FAILURES = ("emulation failure", "KVM internal error", "failed to initialize kvm")
_CACHE_FILE = "accel-probe.json"


def host_tsc_khz() -> int:
    """The host TSC rate in kHz (from /proc/cpuinfo), 0 if unknown."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    return 0


async def qemu_version(binary: str, timeout: float = 5.0) -> str:
    """First line of `qemu -version`; raises OSError if the binary cannot run."""
    ok, detail = await tool_version(binary, "-version", timeout)
    if not ok:
        raise OSError(detail)
    return detail


@dataclass(frozen=True)
class ProbeAssets:
    kernel: Path
    initrd: Path | None
    rootfs: Path


class AccelSelector:
    """The accelerator for the next VM start, and why."""

    def __init__(
        self,
        *,
        mode: str,
        binary: str,
        state_dir: Path,
        assets: ProbeAssets | None,
        tsc_khz: int,
        user: VmmUser | None = None,
    ) -> None:
        """`user`: who VMs run as under KVM; the probe runs QEMU as that user too."""
        if mode not in ("auto", "kvm", "tcg"):
            raise ValueError(f"accel must be auto, kvm or tcg, not {mode!r}")
        self._binary = binary
        self._user = user
        self._state_dir = state_dir
        self._assets = assets
        self._tsc_khz = tsc_khz
        self._probe: asyncio.Task[tuple[str, str]] | None = None
        self.accel = "tcg" if mode == "auto" else mode
        self.detail = "probing KVM; TCG meanwhile" if mode == "auto" else f"configured: {mode}"
        self._auto = mode == "auto"

    def current(self) -> str:
        """The accelerator to use now; in auto mode the first call starts the probe in the background."""
        if self._auto and self._probe is None:
            self._probe = asyncio.create_task(self._run())
        return self.accel

    async def settled(self) -> str:
        """Wait for the probe (if any) to conclude."""
        self.current()
        if self._probe is not None:
            await asyncio.shield(self._probe)
        return self.accel

    async def close(self) -> None:
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe

    async def _run(self) -> tuple[str, str]:
        try:
            self.accel, self.detail = await self._probe_cached()
        except Exception as e:  # the probe must never break the backend: fall back to TCG
            self.accel, self.detail = "tcg", f"KVM probe failed: {e}"
        return self.accel, self.detail

    async def _probe_cached(self) -> tuple[str, str]:
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "tcg", "no usable /dev/kvm"
        if self._assets is None:
            return "tcg", "no probe guest configured"
        key = "|".join(
            [
                await qemu_version(self._binary),
                os.uname().release,
                str((await asyncio.to_thread(self._assets.kernel.stat)).st_mtime_ns),
                repr(self._user),
            ]
        )
        cache = self._state_dir / _CACHE_FILE
        with contextlib.suppress(OSError, ValueError):
            cached = json.loads(await asyncio.to_thread(cache.read_text))
            if cached.get("key") == key:
                return cached["accel"], f"{cached['detail']} (cached)"
        accel, detail = await self._boot_probe(self._assets)
        await asyncio.to_thread(self._state_dir.mkdir, parents=True, exist_ok=True)
        data = json.dumps({"key": key, "accel": accel, "detail": detail})
        await asyncio.to_thread(cache.write_text, data)
        return accel, detail

    async def _boot_probe(self, assets: ProbeAssets) -> tuple[str, str]:
        vm_dir = self._state_dir / "accel-probe"
        await asyncio.to_thread(shutil.rmtree, vm_dir, True)
        await asyncio.to_thread(vm_dir.mkdir, parents=True)
        spec = LaunchSpec(
            vm_id=PROBE_VM_ID,
            vm_dir=vm_dir,
            vcpu_count=1,
            memory_bytes=256 * 1024 * 1024,
            cpu_template="",
            kernel=assets.kernel,
            initrd=assets.initrd,
            customer_kernel_args="panic=-1",
            guest_kernel_args=f"metald.vm_id={PROBE_VM_ID}",
            disks=(DiskSpec("root", assets.rootfs, read_only=True, is_root=True),),
            nics=(),
            netns=None,
            console_type="SERIAL",
            console_path=vm_dir / "console.log",
        )
        fds = await asyncio.to_thread(open_vmm_files, spec)
        host = HostOptions(binary=self._binary, accel="kvm", tsc_khz=self._tsc_khz)
        # setpriv: the probe dies with the daemon (no preexec_fn in a multi-threaded daemon).
        argv = wrap_argv(qemu_argv(spec, host, fds), netns=None, user=self._user, pdeathsig=True)
        log_path = vm_dir / VMM_LOG
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=vm_dir,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                pass_fds=fds.all(),
            )
        finally:
            os.close(log_fd)
            close_fds(fds)
        watch = ReadyWatch(spec.console_path, PROBE_VM_ID, 0)
        exited = asyncio.create_task(proc.wait())
        try:
            while time.monotonic() - started < PROBE_TIMEOUT and not await watch.poll():
                if (await asyncio.wait({exited}, timeout=0.1))[0]:
                    break
        finally:
            crashed = exited.done()
            if not crashed:
                proc.kill()
            await exited
        elapsed = time.monotonic() - started
        output = await asyncio.to_thread(lambda: _read_text(log_path) + _read_text(spec.console_path))
        await asyncio.to_thread(shutil.rmtree, vm_dir, True)
        if failure := next((f for f in _KVM_FAILURES if f in output), None):
            return "tcg", f"KVM probe failed: {failure}"
        if watch.ready:
            return "kvm", f"KVM probe guest ready in {elapsed:.1f}s"
        if crashed:
            last = output.strip().splitlines()[-1:] or [""]
            return "tcg", f"KVM probe failed: QEMU exited with {proc.returncode}: {last[0][:200]}"
        return "tcg", f"KVM probe failed: guest not ready within {PROBE_TIMEOUT:.0f}s"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
