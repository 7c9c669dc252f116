"""A guest cannot fill the host's disk through its console log (issue 11), against a running daemon:
a customer's guest prints 400 KB to its serial console through ExecVm; on disk its console log and
the one rotated file stay within the daemon's console_log_max_bytes, the newest output is kept, and
another customer creates and boots as usual."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import stop_and_sweep
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

BOUND = 64 * 1024  # the smallest bound the daemon accepts
FLOOD = 400_000


@pytest.fixture
def bounded(tmp_path: Path, assets_dir: Path) -> Iterator[Daemon]:
    daemon = Daemon(
        tmp_path / "metald", assets_dir, "--no-network-enabled", "--console-log-max-bytes", str(BOUND)
    ).start()
    yield daemon
    stop_and_sweep(daemon)


def _rpc(daemon: Daemon) -> Rpc:
    return Rpc(daemon.url, "c" + uuid.uuid4().hex[:10])


def test_a_flooding_guest_keeps_its_console_log_within_the_bound(bounded: Daemon) -> None:
    flooder, neighbour = _rpc(bounded), _rpc(bounded)
    try:
        vm_id = flooder.create()
        flooder.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True, "wait_timeout_seconds": 90})
        script = f"head -c {FLOOD} /dev/zero | tr '\\0' x > /dev/ttyS0; echo FLOOD_END > /dev/ttyS0"
        ran = flooder.ok("ExecVm", {"vm_id": vm_id, "command": ["sh", "-c", script], "timeout_seconds": 120})
        assert ran.get("exit_code", 0) == 0, ran
        console = bounded.data_dir / "vms" / vm_id / "console.log"
        rotated = console.with_name("console.log.1")
        deadline = time.monotonic() + 10
        while "FLOOD_END" not in console.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "FLOOD_END" in console.read_text(errors="replace"), "the newest output is kept"
        assert rotated.exists(), "older output went to the one rotated file"
        on_disk = console.stat().st_size + rotated.stat().st_size
        assert on_disk <= BOUND, f"{on_disk} bytes of console log for a bound of {BOUND}"
        # The other customer is not starved of disk: create and boot as usual.
        other = neighbour.create()
        neighbour.ok("BootVm", {"vm_id": other, "wait_for_ready": True, "wait_timeout_seconds": 90})
        assert neighbour.state(other) == "VM_STATE_RUNNING"
    finally:
        flooder.delete_all()
        neighbour.delete_all()
