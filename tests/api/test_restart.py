"""A daemon killed with SIGKILL and restarted keeps every VM, its state, and its running guests."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import serving
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_daemon(tmp_path: Path, assets_dir: Path) -> Iterator[Daemon]:
    with serving(Daemon(tmp_path / "state", assets_dir, name="restart")) as d:
        yield d


def test_restart_keeps_states_and_readopts_guests(own_daemon: Daemon) -> None:
    rpc = Rpc(own_daemon.url, "restart-customer")
    created = rpc.create(vm_id="keep-created")
    running = [rpc.create(vm_id=f"keep-running-{i}") for i in range(3)]
    stopped = rpc.create(vm_id="keep-stopped")
    for vm_id in running:
        rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True})
    rpc.ok("PauseVm", {"vm_id": running[2]})
    rpc.ok("BootVm", {"vm_id": stopped})
    rpc.ok("ShutdownVm", {"vm_id": stopped, "force": True})
    pids = {v: int(rpc.info(v)["backend_info"]["process_id"]) for v in running}

    own_daemon.kill9()
    os.kill(pids[running[1]], signal.SIGKILL)  # a VMM dies while the daemon is down
    time.sleep(0.5)
    own_daemon.start()

    assert rpc.state(created) == "VM_STATE_CREATED"
    assert rpc.state(stopped) == "VM_STATE_SHUTDOWN"
    assert rpc.state(running[0]) == "VM_STATE_RUNNING"
    assert rpc.state(running[2]) == "VM_STATE_PAUSED"
    assert rpc.state(running[1]) == "VM_STATE_SHUTDOWN"
    assert rpc.info(running[1])["backend_info"]["shutdown_reason"] == "vmm_crashed"  # from exit.json
    assert int(rpc.info(running[0])["backend_info"]["process_id"]) == pids[running[0]], "same VMM, re-adopted"
    assert rpc.ok("ListVms", {})["total_count"] == 5

    # the re-adopted VMMs are controllable
    assert rpc.ok("PauseVm", {"vm_id": running[0]})["state"] == "VM_STATE_PAUSED"
    assert rpc.ok("ResumeVm", {"vm_id": running[2]})["state"] == "VM_STATE_RUNNING"
    assert rpc.ok("ShutdownVm", {"vm_id": running[2]})["state"] == "VM_STATE_SHUTDOWN"
    rpc.ok("BootVm", {"vm_id": running[1]})  # the dead one boots again
    # and their exits are still noticed without any RPC
    pid = int(rpc.info(running[1])["backend_info"]["process_id"])
    os.kill(pid, signal.SIGKILL)
    rpc.wait_state(running[1], "VM_STATE_SHUTDOWN", timeout=10)
    rpc.delete_all()
    assert rpc.ok("ListVms", {}).get("total_count", 0) == 0
