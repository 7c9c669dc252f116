"""QemuBackend at the edges of a guest's life (issue 11): a reboot before the guest is up, a reboot
the guest makes itself, a VMM that ends while BootVm waits for ready, a guest flooding its console."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from metald.backends.qemu.agent import GuestAgent
from metald.backends.qemu.backend import QemuBackend
from metald.domain.errors import ErrorCode, MetaldError
from tests.e2e.conftest import Events, tcg_backend
from tests.e2e.test_qemu_backend import READY_TIMEOUT, launch_spec

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed"),
]
BANNER = "Linux version "


async def _agent(vm_dir: Path) -> GuestAgent:
    agent = await GuestAgent.connect(vm_dir)
    assert await agent.ping(15.0), "guest agent does not answer"
    return agent


async def test_reboot_at_once_and_guest_reboot_restart_readiness(
    assets_dir: Path, tmp_path: Path, backends: Callable[..., QemuBackend]
) -> None:
    events: Events = []
    backend = backends(events)
    spec = launch_spec(assets_dir, tmp_path / "vm-rb", "vm-rb")
    await backend.start(spec)
    deadline = time.monotonic() + READY_TIMEOUT  # the kernel has started, the guest is not up yet:
    while BANNER not in spec.console_path.read_text(errors="replace"):  # it cannot take a request
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert not (await backend.runtime("vm-rb")).guest_ready  # type: ignore[union-attr]
    await backend.reboot("vm-rb", force=False)
    assert await backend.wait_ready("vm-rb", READY_TIMEOUT)
    assert spec.console_path.read_text(errors="replace").count(BANNER) == 2, "the reboot was lost"

    agent = await _agent(spec.vm_dir)
    try:
        await agent.command("reboot")  # the guest reboots by itself: QEMU resets it, runs on
    finally:
        await agent.close()
    deadline = time.monotonic() + 10
    while (runtime := await backend.runtime("vm-rb")) is not None and runtime.guest_ready:
        assert time.monotonic() < deadline, "guest_ready stayed true through the guest's reboot"
        await asyncio.sleep(0.05)
    assert await backend.wait_ready("vm-rb", READY_TIMEOUT)
    assert spec.console_path.read_text(errors="replace").count(BANNER) == 3
    assert events == []


async def test_wait_ready_ends_when_the_vmm_exits(
    assets_dir: Path, tmp_path: Path, backends: Callable[..., QemuBackend]
) -> None:
    events: Events = []
    backend = backends(events)
    runtime = await backend.start(launch_spec(assets_dir, tmp_path / "vm-ex", "vm-ex"))
    waiting = asyncio.create_task(backend.wait_ready("vm-ex", READY_TIMEOUT))
    await asyncio.sleep(0.3)
    os.kill(runtime.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(MetaldError) as err:
        await waiting
    assert time.monotonic() - started < 10
    assert err.value.code is ErrorCode.FAILED_PRECONDITION and err.value.reason == "VM_EXITED"
    assert err.value.metadata["exit_reason"] == "vmm_crashed"
    assert events == [("vm-ex", "vmm_crashed")]


async def test_a_flooding_guest_cannot_grow_its_console_log_past_the_bound(
    assets_dir: Path, tmp_path: Path, backends: Callable[..., QemuBackend]
) -> None:
    bound = 64 * 1024
    backend = backends([], console_log_max_bytes=bound)
    spec = launch_spec(assets_dir, tmp_path / "vm-fl", "vm-fl")
    await backend.start(spec)
    assert await backend.wait_ready("vm-fl", READY_TIMEOUT)
    agent = await _agent(spec.vm_dir)
    try:
        code, out = await agent.exec(
            "head -c 400000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo FLOOD_END > /dev/ttyS0", timeout=120
        )
    finally:
        await agent.close()
    assert code == 0, out
    rotated = spec.console_path.with_name("console.log.1")
    for _ in range(100):
        if "FLOOD_END" in spec.console_path.read_text(errors="replace"):
            break
        await asyncio.sleep(0.1)
    assert "FLOOD_END" in spec.console_path.read_text(errors="replace"), "the newest output is kept"
    assert rotated.exists()
    assert spec.console_path.stat().st_size + rotated.stat().st_size <= bound


async def test_a_kernel_that_is_not_a_kernel_is_the_customers_error(
    assets_dir: Path, tmp_path: Path, backends: Callable[..., QemuBackend]
) -> None:
    junk = tmp_path / "not-a-kernel"
    junk.write_bytes(b"MZ this is not a kernel\n" * 1000)
    spec = dataclasses.replace(launch_spec(assets_dir, tmp_path / "vm-jk", "vm-jk"), kernel=junk)
    with pytest.raises(MetaldError) as err:
        await backends([]).start(spec)
    assert err.value.code is ErrorCode.FAILED_PRECONDITION and err.value.reason == "KERNEL_INVALID"


async def test_missing_qemu_img_is_unhealthy(tmp_path: Path) -> None:
    backend = tcg_backend(tmp_path, qemu_img_binary=str(tmp_path / "no-qemu-img"))
    health = await backend.ping()
    assert health.status == "unhealthy" and "no-qemu-img" in health.detail
    await backend.close()
