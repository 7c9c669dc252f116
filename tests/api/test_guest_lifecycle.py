"""Issue 3 over the API, on the default guest: every RPC acts on a real guest, and the guest's own
doings (poweroff, a VMM crash) show up without any RPC."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from metald.backends.qemu.agent import GuestAgent
from tests.support.daemon import Daemon, vmm_pids
from tests.support.rpc import Rpc

pytestmark = pytest.mark.e2e


def guest_exec(vm_dir: Path, command: str, timeout: float = 30) -> tuple[int, str]:
    async def run() -> tuple[int, str]:
        agent = await GuestAgent.connect(vm_dir)
        try:
            assert await agent.ping(timeout=20), "guest agent did not answer"
            return await agent.exec(command, timeout=timeout)
        finally:
            await agent.close()

    return asyncio.run(run())


def ready_lines(vm_dir: Path) -> int:
    log = vm_dir / "console.log"
    return log.read_text(errors="replace").count("METALD_READY") if log.exists() else 0


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def cpu_nanos(rpc: Rpc, vm_id: str) -> int:
    return int(rpc.info(vm_id)["metrics"].get("cpu_time_nanos", 0))


def test_full_lifecycle_on_a_real_guest(daemon: Daemon, rpc: Rpc) -> None:
    vm_id = rpc.create()
    vm_dir = daemon.data_dir / "vms" / vm_id
    rpc.ok("BootVm", {"vm_id": vm_id})
    wait_for(lambda: ready_lines(vm_dir) == 1, 60, "the ready line")
    assert rpc.info(vm_id)["backend_info"]["guest_ready"] == "true"

    rpc.ok("PauseVm", {"vm_id": vm_id})
    paused_at = cpu_nanos(rpc, vm_id)
    time.sleep(1.0)
    assert cpu_nanos(rpc, vm_id) - paused_at < 100_000_000, "a paused guest burns (almost) no CPU"
    rpc.ok("ResumeVm", {"vm_id": vm_id})
    time.sleep(1.0)
    assert cpu_nanos(rpc, vm_id) > paused_at

    rpc.ok("RebootVm", {"vm_id": vm_id})
    wait_for(lambda: ready_lines(vm_dir) == 2, 60, "the ready line after reboot")

    pid = int(rpc.info(vm_id)["backend_info"]["process_id"])
    assert rpc.ok("ShutdownVm", {"vm_id": vm_id, "timeout_seconds": 30})["state"] == "VM_STATE_SHUTDOWN"
    assert "METALD_POWEROFF" in (vm_dir / "console.log").read_text(errors="replace"), "clean guest shutdown"
    assert rpc.info(vm_id)["backend_info"]["shutdown_reason"] == "guest_poweroff"
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]

    rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True})
    assert ready_lines(vm_dir) == 3
    rpc.ok("ShutdownVm", {"vm_id": vm_id, "force": True})
    assert rpc.info(vm_id)["backend_info"]["shutdown_reason"] == "killed"
    rpc.ok("DeleteVm", {"vm_id": vm_id})
    assert not vm_dir.exists(), "nothing left on disk"
    assert not [
        p for p in vmm_pids(daemon.data_dir) if vm_id.encode() in Path(f"/proc/{p}/cmdline").read_bytes()
    ]


def test_disk_metrics_move_and_read_only_disk_refuses_writes(daemon: Daemon, rpc: Rpc) -> None:
    vm_id = rpc.create(
        {
            "storage": [
                {"device_id": "root", "path_on_host": "/assets/rootfs.ext4", "is_root_device": True},
                {"device_id": "data", "path_on_host": "/assets/data.ext4", "is_read_only": True},
            ],
            "boot": {"kernel_path": "/assets/vmlinux", "initrd_path": "/assets/initrd"},
        }
    )
    vm_dir = daemon.data_dir / "vms" / vm_id
    rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True})
    before = rpc.info(vm_id)["metrics"]
    rc, out = guest_exec(vm_dir, "dd if=/dev/zero of=/root/blob bs=64k count=64 && sync")
    assert rc == 0, out
    after = rpc.info(vm_id)["metrics"]
    assert int(after["disk_write_bytes"]) >= int(before.get("disk_write_bytes", 0)) + 4 * 1024 * 1024

    rc, out = guest_exec(vm_dir, "dd if=/dev/zero of=/dev/vdb bs=4k count=1 oflag=direct")
    assert rc != 0, f"writing to the read-only disk succeeded: {out}"
    rc, out = guest_exec(vm_dir, "cat /sys/block/vdb/ro")
    assert (rc, out.strip()) == (0, "1")
    rpc.ok("DeleteVm", {"vm_id": vm_id, "force": True})


def test_guest_poweroff_and_vmm_crash_need_no_rpc(daemon: Daemon, rpc: Rpc) -> None:
    vm_id = rpc.create()
    vm_dir = daemon.data_dir / "vms" / vm_id
    rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True})
    asyncio.run(_agent_command(vm_dir, "poweroff"))
    rpc.wait_state(vm_id, "VM_STATE_SHUTDOWN", timeout=20)
    assert rpc.info(vm_id)["backend_info"]["shutdown_reason"] == "guest_poweroff"

    rpc.ok("BootVm", {"vm_id": vm_id})
    pid = int(rpc.info(vm_id)["backend_info"]["process_id"])
    os.kill(pid, signal.SIGKILL)
    rpc.wait_state(vm_id, "VM_STATE_SHUTDOWN", timeout=10)
    assert rpc.info(vm_id)["backend_info"]["shutdown_reason"] == "vmm_crashed"
    assert rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True})["state"] == "VM_STATE_RUNNING"
    rpc.ok("DeleteVm", {"vm_id": vm_id, "force": True})


async def _agent_command(vm_dir: Path, line: str) -> str:
    agent = await GuestAgent.connect(vm_dir)
    try:
        assert await agent.ping(timeout=20)
        return await agent.command(line)
    finally:
        await agent.close()
