"""Churn: create -> boot -> pause -> resume -> reboot -> shutdown -> delete, cycle after cycle, several
at once; afterwards the daemon and the host are back where they started.

Compared before (after one warm-up cycle, which creates the lazily made things: the host namespace,
the customer's bridge, the daemon's thread pools) and after: QEMU and supervisor processes, zombie
children of the daemon, VM directories, sockets in the data dir, VM namespaces and their TAPs, links
in the daemon's host namespace, devices in the root namespace named after the VMs, cgroups named
after them, the daemon's open file descriptors by kind, its threads, and VM rows and IP addresses in
the store. Every other cycle has a NIC; every other one waits for the guest and goes the graceful
way (agent reboot, ACPI power-off), the others force.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.reliability.common import knob, wait_for
from tests.reliability.conftest import MakeDaemon
from tests.reliability.host import Footprint, db_rows, fd_growth, fd_kinds, status_value, steady_fd_kinds
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

CYCLES = knob("CHURN_CYCLES", 12, 300)
PARALLEL = knob("CHURN_PARALLEL", 3, 3)  # two cores: at most three TCG guests at once
CUSTOMER = "churn"
NIC = {"network": [{"interface_id": "eth0"}]}


def cycle(rpc: Rpc, n: int) -> str:
    vm_id = f"rel-churn-{n:04d}"
    graceful = n % 2 == 1
    rpc.ok("CreateVm", {"vm_id": vm_id, "config": NIC if n % 2 == 0 else {}})
    assert rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": graceful})["state"] == "VM_STATE_RUNNING"
    assert rpc.ok("PauseVm", {"vm_id": vm_id})["state"] == "VM_STATE_PAUSED"
    assert rpc.ok("ResumeVm", {"vm_id": vm_id})["state"] == "VM_STATE_RUNNING"
    assert rpc.ok("RebootVm", {"vm_id": vm_id, "force": not graceful})["state"] == "VM_STATE_RUNNING"
    body = {"vm_id": vm_id, "force": not graceful, "timeout_seconds": 20}
    assert rpc.ok("ShutdownVm", body)["state"] == "VM_STATE_SHUTDOWN"
    assert rpc.ok("DeleteVm", {"vm_id": vm_id}) == {"success": True}
    return vm_id


def snapshot(daemon: Daemon, vm_ids: list[str], steady: bool = False) -> tuple[Footprint, Counter[str], int]:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    fds = steady_fd_kinds(pid, daemon.data_dir) if steady else fd_kinds(pid, daemon.data_dir)
    return Footprint.of(daemon, vm_ids), fds, status_value(pid, "Threads")


def test_churn_leaves_nothing_behind(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon(name="rel-chn")
    main = Rpc(daemon.url, CUSTOMER)
    ids = ["rel-churn-warm", *(f"rel-churn-{n:04d}" for n in range(CYCLES))]
    assert main.ok("CreateVm", {"vm_id": ids[0], "config": NIC})
    main.ok("BootVm", {"vm_id": ids[0], "wait_for_ready": True})
    during = Footprint.of(daemon, ids)  # positive control: a running VM with a NIC is seen
    assert len(during.qemus) == 1 and len(during.namespaces) == 1 and len(during.taps) == 1, during
    main.ok("DeleteVm", {"vm_id": ids[0], "force": True})
    before, fds_before, threads_before = snapshot(daemon, ids, steady=True)
    print(f"before: {sum(fds_before.values())} fds {dict(fds_before)}, {threads_before} threads")

    started = time.monotonic()
    workers = [Rpc(daemon.url, CUSTOMER) for _ in range(PARALLEL)]
    with ThreadPoolExecutor(PARALLEL) as pool:
        done = list(pool.map(lambda n: cycle(workers[n % PARALLEL], n), range(CYCLES)))
    took = time.monotonic() - started
    for worker in workers:
        worker.client.close()
    assert len(done) == CYCLES
    print(f"{CYCLES} cycles, {PARALLEL} at a time, in {took:.0f}s ({took / CYCLES:.1f}s per cycle)")

    # The daemon closes the workers' connections when it sees them end: give it a moment.
    def settled() -> tuple[Footprint, Counter[str], int] | None:
        now = snapshot(daemon, ids)
        return now if now[0] == before and not fd_growth(fds_before, now[1]) else None

    try:
        after, fds_after, threads_after = wait_for(settled, 20, "host and daemon back to the baseline")
    except AssertionError:
        after, fds_after, threads_after = snapshot(daemon, ids)
    print(f"after: {sum(fds_after.values())} fds {dict(fds_after)}, {threads_after} threads")
    assert before.changes(after) == {}, f"left behind (added, removed): {before.changes(after)}"
    assert not fd_growth(fds_before, fds_after), f"daemon holds more fds: {fd_growth(fds_before, fds_after)}"
    assert threads_after <= threads_before + 2, (threads_before, threads_after)
    assert not before.qemus and not before.vm_dirs and not before.namespaces  # and so not after
    assert db_rows(daemon.data_dir, "SELECT COUNT(*) FROM vms") == [(0,)]
    held = db_rows(
        daemon.data_dir, "SELECT pool, address, owner FROM addresses WHERE owner NOT LIKE 'customer:%'"
    )
    assert held == [], f"IP addresses, MACs or device ids still held by deleted VMs: {held}"
    assert main.ok("ListVms", {}).get("total_count", 0) == 0
