"""QemuBackend driven directly on real QEMU microvm guests (TCG, the default guest image).

At most three VMs run at once: the test machine has two cores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from metald.backends import procfs
from metald.backends.qemu import layout
from metald.backends.qemu.agent import GuestAgent
from metald.backends.qemu.backend import QemuBackend
from metald.backends.vmm.layout import EXIT_STATE
from metald.domain.errors import ErrorCode, MetaldError
from metald.ports import DiskSpec, LaunchSpec, VmRuntime
from tests.e2e.conftest import Events, tcg_backend, wait_until
from tests.support.specs import bare_spec

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed"),
]

READY_TIMEOUT = 60.0
EXIT_EVENT_TIMEOUT = 10.0


def launch_spec(
    assets: Path,
    vm_dir: Path,
    vm_id: str,
    *,
    data_disk: bool = False,
    root: Path | None = None,
    console_type: str = "SERIAL",
) -> LaunchSpec:
    disks = [DiskSpec("root", root or assets / "rootfs.ext4", read_only=False, is_root=True)]
    if data_disk:
        disks.append(DiskSpec("data", assets / "data.ext4", read_only=True, is_root=False))
    return bare_spec(
        vm_id,
        vm_dir,
        assets / "vmlinux",
        disks,
        initrd=assets / "initrd",
        guest_kernel_args=f"metald.vm_id={vm_id}",
        console_type=console_type,
    )


def _gone(pid: int) -> bool:
    stat = procfs.read_stat(pid)
    return stat is None or stat.state == "Z"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _agent_exec(vm_dir: Path, command: str) -> tuple[int, str]:
    agent = await GuestAgent.connect(vm_dir)
    try:
        assert await agent.ping(15.0), "guest agent does not answer"
        return await agent.exec(command)
    finally:
        await agent.close()


async def _agent_poweroff(vm_dir: Path) -> None:
    agent = await GuestAgent.connect(vm_dir)
    try:
        assert await agent.ping(15.0)
        assert await agent.command("poweroff") == "ok"
    finally:
        await agent.close()


async def _runtime(backend: QemuBackend, vm_id: str) -> VmRuntime:
    runtime = await backend.runtime(vm_id)
    assert runtime is not None, f"{vm_id} has no runtime"
    return runtime


async def _cpu_seconds_over(backend: QemuBackend, vm_id: str, seconds: float) -> float:
    before = (await backend.metrics(vm_id)).cpu_time_nanos
    await asyncio.sleep(seconds)
    return ((await backend.metrics(vm_id)).cpu_time_nanos - before) / 1e9


async def test_lifecycle_disks_and_metrics(
    assets_dir: Path, tmp_path: Path, backends: Callable[[Events], QemuBackend]
) -> None:
    events: Events = []
    backend = backends(events)
    # A vm_dir far beyond the 108-byte AF_UNIX limit: sockets must still work.
    vm_dir = tmp_path / ("d" * 60) / ("e" * 60) / "vm-life"
    # A private copy of the base image: the shared assets may be rebuilt by others meanwhile.
    base = tmp_path / "rootfs.ext4"
    shutil.copyfile(assets_dir / "rootfs.ext4", base)
    base_digest = _sha256(base)
    spec = launch_spec(assets_dir, vm_dir, "vm-life", data_disk=True, root=base)

    await backend.prepare(spec)
    await backend.prepare(spec)  # idempotent
    started = await backend.start(spec)
    assert started.extra == {"accelerator": "tcg", "cpu_model": "qemu64"}
    assert not started.paused
    assert await backend.wait_ready("vm-life", READY_TIMEOUT)
    runtime = await _runtime(backend, "vm-life")
    assert runtime.guest_ready and runtime.socket_path == str(vm_dir / "qmp.sock")
    pid = runtime.pid
    assert procfs.read_cwd(pid) == str(vm_dir)

    # The writable root is an overlay: the guest's writes show in metrics, not in the base image.
    written = (await backend.metrics("vm-life")).disk_write_bytes
    assert await _agent_exec(vm_dir, "echo x > /root/f; sync") == (0, "")
    metrics = await backend.metrics("vm-life")
    assert metrics.disk_write_bytes > written
    assert metrics.disk_read_bytes > 0 and metrics.memory_usage_bytes > 50 * 1024 * 1024
    # The read-only data disk refuses writes inside the guest.
    rc, out = await _agent_exec(vm_dir, "dd if=/dev/zero of=/dev/vdb bs=4k count=1")
    assert rc != 0, out

    # Pause: the guest's busy loop no longer burns host CPU; resume: it does again (the thresholds
    # leave room for a host shared with other work).
    rc, _ = await _agent_exec(vm_dir, "sh -c 'while :; do :; done' >/dev/null 2>&1 &")
    assert rc == 0
    assert await _cpu_seconds_over(backend, "vm-life", 1.0) > 0.2
    await backend.pause("vm-life")
    assert (await _runtime(backend, "vm-life")).paused
    await asyncio.sleep(0.2)
    assert await _cpu_seconds_over(backend, "vm-life", 1.0) < 0.1
    await backend.resume("vm-life")
    assert await _cpu_seconds_over(backend, "vm-life", 1.0) > 0.2

    # Reboots: the ready line appears again after each one, in the same QEMU.
    for force in (False, True):
        await backend.reboot("vm-life", force=force)
        assert not (await _runtime(backend, "vm-life")).guest_ready
        assert await backend.wait_ready("vm-life", READY_TIMEOUT), f"no ready line after reboot {force=}"
    assert spec.console_path.read_text().count("METALD_READY vm_id=vm-life ") == 3
    assert (await _runtime(backend, "vm-life")).pid == pid

    # Graceful stop: ACPI power button, clean guest poweroff, QEMU gone, nothing for the listener.
    assert await backend.stop("vm-life", graceful=True, timeout=30) == "guest_poweroff"
    assert "METALD_POWEROFF" in spec.console_path.read_text()
    assert _gone(pid)
    assert await backend.runtime("vm-life") is None
    assert not (vm_dir / layout.QMP_SOCKET).exists()
    assert await backend.stop("vm-life", graceful=True, timeout=30) == "not_running"
    assert _sha256(base) == base_digest

    # Boot again: the overlay kept the guest's file. Then a forced stop.
    second_pid = (await backend.start(spec)).pid
    assert second_pid != pid
    assert await backend.wait_ready("vm-life", READY_TIMEOUT)
    assert await _agent_exec(vm_dir, "cat /root/f") == (0, "x")
    assert await backend.stop("vm-life", graceful=False, timeout=30) == "killed"
    assert _gone(second_pid)

    await backend.destroy("vm-life", vm_dir)
    await backend.destroy("vm-life", vm_dir)  # idempotent
    assert not vm_dir.exists()
    assert events == []
    assert _sha256(base) == base_digest


async def test_stop_before_ready_quits_at_once(
    assets_dir: Path, tmp_path: Path, backends: Callable[[Events], QemuBackend]
) -> None:
    events: Events = []
    backend = backends(events)
    spec = launch_spec(assets_dir, tmp_path / "vm-early", "vm-early")
    runtime = await backend.start(spec)
    started = time.monotonic()
    assert await backend.stop("vm-early", graceful=True, timeout=30) == "quit"
    assert time.monotonic() - started < 5
    assert _gone(runtime.pid) and events == []


async def test_start_failure_reports_qemu_error(
    assets_dir: Path, tmp_path: Path, backends: Callable[[Events], QemuBackend]
) -> None:
    backend = backends([])
    spec = dataclasses.replace(
        launch_spec(assets_dir, tmp_path / "vm-bad", "vm-bad"), kernel=tmp_path / "nope"
    )
    with pytest.raises(MetaldError) as failed:
        await backend.start(spec)
    assert failed.value.code is ErrorCode.INTERNAL and "nope" in failed.value.message
    assert await backend.runtime("vm-bad") is None
    assert not any(procfs.read_cwd(int(p)) == str(spec.vm_dir) for p in os.listdir("/proc") if p.isdigit())


async def test_unrequested_exits_reach_the_listener(
    assets_dir: Path, tmp_path: Path, backends: Callable[[Events], QemuBackend]
) -> None:
    events: Events = []
    backend = backends(events)
    specs = [
        launch_spec(assets_dir, tmp_path / "vm-off", "vm-off", console_type="VIRTIO_CONSOLE"),
        launch_spec(assets_dir, tmp_path / "vm-crash", "vm-crash"),
    ]
    runtimes = [await backend.start(spec) for spec in specs]
    for spec in specs:
        assert await backend.wait_ready(spec.vm_id, READY_TIMEOUT)

    # The virtio console (hvc0) went to console_path; ttyS0, with the early boot, to serial.log.
    assert "Linux version" not in specs[0].console_path.read_text()
    assert "Linux version" in (specs[0].vm_dir / layout.SERIAL_LOG).read_text()
    await _agent_poweroff(specs[0].vm_dir)
    assert await wait_until(lambda: ("vm-off", "guest_poweroff") in events, EXIT_EVENT_TIMEOUT), events
    os.kill(runtimes[1].pid, signal.SIGKILL)
    started = time.monotonic()
    assert await wait_until(lambda: ("vm-crash", "vmm_crashed") in events, EXIT_EVENT_TIMEOUT), events
    assert time.monotonic() - started < 2.0
    assert sorted(events) == [("vm-crash", "vmm_crashed"), ("vm-off", "guest_poweroff")]
    assert [backend.last_exit_reason(s.vm_id) for s in specs] == ["guest_poweroff", "vmm_crashed"]
    for spec, runtime in zip(specs, runtimes, strict=True):
        assert _gone(runtime.pid)
        assert await backend.runtime(spec.vm_id) is None


async def test_readoption_after_daemon_restart(
    assets_dir: Path, tmp_path: Path, backends: Callable[[Events], QemuBackend]
) -> None:
    first = backends([])
    specs = {name: launch_spec(assets_dir, tmp_path / name, name) for name in ("vm-a", "vm-b", "vm-c")}
    pids = {name: (await first.start(spec)).pid for name, spec in specs.items()}
    for name in specs:
        assert await first.wait_ready(name, READY_TIMEOUT)
    await first.close()  # the daemon goes away; its VMs do not
    assert all(not _gone(pid) for pid in pids.values())
    os.kill(pids["vm-c"], signal.SIGKILL)  # dies while no daemon watches
    assert await wait_until(lambda: (specs["vm-c"].vm_dir / EXIT_STATE).exists(), 5.0)

    events: Events = []
    second = backends(events)
    adopted = await second.adopt(specs["vm-a"])
    assert adopted is not None and adopted.pid == pids["vm-a"] and adopted.guest_ready
    assert (await second.adopt(specs["vm-b"])) is not None
    assert await second.adopt(specs["vm-c"]) is None
    assert not (specs["vm-c"].vm_dir / layout.QMP_SOCKET).exists()
    # Why it ended is not lost with exit.json: the service records it as the shutdown reason.
    assert second.last_exit_reason("vm-c") == "vmm_crashed"
    assert second.last_exit_reason("vm-a") is None
    assert events == []

    # Controllable: pause/resume through the re-connected QMP, then a graceful stop.
    await second.pause("vm-a")
    assert (await _runtime(second, "vm-a")).paused
    await second.resume("vm-a")
    assert not (await _runtime(second, "vm-a")).paused
    assert await second.stop("vm-a", graceful=True, timeout=30) == "guest_poweroff"
    assert _gone(pids["vm-a"])

    # Exit events of an adopted VM arrive too.
    await _agent_poweroff(specs["vm-b"].vm_dir)
    assert await wait_until(lambda: events == [("vm-b", "guest_poweroff")], EXIT_EVENT_TIMEOUT), events


async def test_ping_and_accel_probe(assets_dir: Path, tmp_path: Path) -> None:
    """auto: the probe boots the default guest under KVM once, concludes, and caches its verdict."""

    def make() -> QemuBackend:
        return QemuBackend(
            qemu_binary="qemu-system-x86_64",
            qemu_img_binary="qemu-img",
            accel="auto",
            state_dir=tmp_path,
            probe_kernel=assets_dir / "vmlinux",
            probe_initrd=assets_dir / "initrd",
            probe_rootfs=assets_dir / "rootfs.ext4",
        )

    first = make()
    health = await first.ping()
    assert health.status == "healthy" and "QEMU emulator version" in health.detail
    verdict = await first.accel.settled()
    assert verdict in ("kvm", "tcg") and "probe" in first.accel.detail
    assert verdict in (await first.ping()).detail
    assert (tmp_path / "accel-probe.json").exists()
    second = make()
    assert await second.accel.settled() == verdict
    assert second.accel.detail.endswith("(cached)")
    await first.close()
    await second.close()

    broken = tcg_backend(tmp_path, qemu_binary="/nonexistent/qemu")
    assert (await broken.ping()).status == "unhealthy"
