"""A daemon stopped with SIGTERM (systemctl stop/restart) leaves its guests running: after a
restart the same VMM processes are re-adopted, RUNNING, and each guest's uptime has gone on
(no reboot). Stopping the VMs too is an explicit choice: `metald serve --stop-vms-on-exit`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from metald.backends import procfs
from metald.backends.qemu.agent import GuestAgent
from tests.reliability.conftest import MakeDaemon
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]


async def _uptime(vm_dir: Path) -> float:
    agent = await GuestAgent.connect(vm_dir)
    try:
        assert await agent.ping(30.0), "guest agent does not answer"
        code, out = await agent.exec("cat /proc/uptime")
    finally:
        await agent.close()
    assert code == 0, out
    return float(out.split()[0])


def _vm_dir(daemon: Daemon, vm_id: str) -> Path:
    return daemon.data_dir / "vms" / vm_id


def test_sigterm_restart_keeps_guests_running(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon(name="sigterm")
    rpc = Rpc(daemon.url, "sigterm-customer")
    vms = [rpc.create(vm_id=f"term-{i}") for i in range(2)]
    for vm_id in vms:
        rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True})
    pids = {v: int(rpc.info(v)["backend_info"]["process_id"]) for v in vms}
    starts = {v: procfs.read_stat(pid).start_time for v, pid in pids.items()}  # type: ignore[union-attr]
    before = {v: asyncio.run(_uptime(_vm_dir(daemon, v))) for v in vms}
    stopped_at = time.monotonic()

    daemon.stop()  # SIGTERM, as systemd sends
    assert daemon.proc is not None and daemon.proc.returncode is not None
    for vm_id, pid in pids.items():
        assert procfs.is_live(pid, starts[vm_id]), f"the VMM of {vm_id} died with the daemon"
    time.sleep(1.0)
    daemon.start()

    for vm_id in vms:
        assert rpc.state(vm_id) == "VM_STATE_RUNNING"
        assert int(rpc.info(vm_id)["backend_info"]["process_id"]) == pids[vm_id], "same VMM, re-adopted"
        uptime = asyncio.run(_uptime(_vm_dir(daemon, vm_id)))
        assert uptime >= before[vm_id] + (time.monotonic() - stopped_at) * 0.5, "the guest rebooted"
    assert rpc.ok("PauseVm", {"vm_id": vms[0]})["state"] == "VM_STATE_PAUSED"  # and controllable
    rpc.delete_all()


def test_stop_vms_on_exit_stops_them(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon("--stop-vms-on-exit", name="stopall")
    rpc = Rpc(daemon.url, "stopall-customer")
    vm_id = rpc.create(vm_id="term-stop")
    rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True})
    pid = int(rpc.info(vm_id)["backend_info"]["process_id"])
    start = procfs.read_stat(pid).start_time  # type: ignore[union-attr]
    daemon.stop()
    assert not procfs.is_live(pid, start), "--stop-vms-on-exit left the VM running"
    daemon.start()
    assert rpc.state(vm_id) == "VM_STATE_SHUTDOWN"
    rpc.delete_all()
