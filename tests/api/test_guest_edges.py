"""The edges of a guest's life against a running daemon (issue 11; tests/e2e/test_qemu_edges.py is
the backend's side): RebootVm right after BootVm reboots for real, `guest_ready` follows a reboot
the guest makes itself, and BootVm(wait_for_ready) of a guest whose VMM ends answers VM_EXITED at
once instead of waiting out its timeout."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

BANNER = "Linux version "


def _banners(console: Path) -> int:
    return console.read_text(errors="replace").count(BANNER) if console.exists() else 0


def _until(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _ready(rpc: Rpc, vm_id: str) -> bool:
    return bool(rpc.info(vm_id)["backend_info"].get("guest_ready") == "true")


def test_reboot_at_once_and_a_guest_reboot_restart_readiness(daemon: Daemon, rpc: Rpc) -> None:
    vm_id = rpc.create()
    console = daemon.data_dir / "vms" / vm_id / "console.log"
    rpc.ok("BootVm", {"vm_id": vm_id})
    _until("the kernel starts", lambda: _banners(console) >= 1)
    assert not _ready(rpc, vm_id), "the guest cannot be up yet"
    assert rpc.ok("RebootVm", {"vm_id": vm_id})["state"] == "VM_STATE_RUNNING"
    _until("the rebooted guest is ready", lambda: _ready(rpc, vm_id))
    assert _banners(console) == 2, "the reboot was lost"

    # The guest resets itself (the exec answers first): guest_ready drops, then comes back.
    reset = "(sleep 0.5; echo b > /proc/sysrq-trigger) >/dev/null 2>&1 &"
    rpc.ok("ExecVm", {"vm_id": vm_id, "command": ["sh", "-c", reset]})
    _until("guest_ready drops while the guest reboots", lambda: not _ready(rpc, vm_id), timeout=15)
    _until("ready again", lambda: _ready(rpc, vm_id))
    assert _banners(console) == 3
    assert rpc.state(vm_id) == "VM_STATE_RUNNING"
    rpc.ok("DeleteVm", {"vm_id": vm_id, "force": True})


def test_waiting_for_a_guest_whose_vmm_ends_answers_at_once(rpc: Rpc) -> None:
    vm_id = rpc.create()
    answer: list[tuple[int, dict[str, object]]] = []
    boot = threading.Thread(
        target=lambda: answer.append(
            rpc.error("BootVm", {"vm_id": vm_id, "wait_for_ready": True, "wait_timeout_seconds": 60})
        )
    )
    boot.start()
    pid: list[int] = []

    def vmm_started() -> bool:
        found = Rpc(rpc.url, rpc.customer).info(vm_id)["backend_info"].get("process_id")
        pid.extend([int(found)] if found else [])
        return bool(found)

    _until("the VMM starts", vmm_started, timeout=30)
    os.kill(pid[0], signal.SIGKILL)
    killed = time.monotonic()
    boot.join(timeout=30)
    assert not boot.is_alive() and time.monotonic() - killed < 10, "BootVm waited out its timeout"
    status, body = answer[0]
    assert (status, body["code"]) == (412, "failed_precondition"), body
    assert body["details"][0]["debug"]["reason"] == "VM_EXITED", body  # type: ignore[index]
    rpc.wait_state(vm_id, "VM_STATE_SHUTDOWN", timeout=10)
    rpc.ok("DeleteVm", {"vm_id": vm_id, "force": True})
