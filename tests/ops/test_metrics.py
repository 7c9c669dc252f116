"""GET /metrics: the reference's names exist, and each value moves when the thing it counts
happens (requests, failures by code, boot durations, active VMs, per-customer and per-state
counts, backend latency and errors)."""

from __future__ import annotations

import httpx
import pytest

from metald import __version__
from tests.ops.conftest import StartDaemon
from tests.ops.support import scrape
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

P = "unkey_metald"


def test_reference_names_and_process_metrics(daemon: Daemon) -> None:
    text = httpx.get(f"{daemon.url}/metrics", timeout=10).text
    for name in (
        f"{P}_vm_create_requests_total",
        f"{P}_vm_boot_duration_seconds",
        f"{P}_active_vms",
        f"{P}_backend_errors_total",
        f"{P}_vm_list_failures_total",
        f"{P}_vm_get_info_request_duration_seconds",
        f"{P}_backend_operation_duration_seconds",
        f"{P}_customer_vms",
        f"{P}_vms",
        "process_resident_memory_bytes",
    ):
        assert f"# TYPE {name} " in text, name
    assert f'{P}_build_info{{version="{__version__}"}} 1.0' in text


def test_request_and_failure_counters_move(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    before = scrape(daemon.url)
    vm_id = rpc.create()
    rpc.error("GetVmInfo", {"vm_id": "vm-that-is-not-there"})
    rpc.error("GetVmInfo", {"vm_id": vm_id}, customer="x" + customer)
    rpc.error("PauseVm", {"vm_id": vm_id})
    assert httpx.post(f"{daemon.url}/vmprovisioner.v1.VmService/ListVms", json={}).status_code == 401
    after = scrape(daemon.url)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert delta(f"{P}_vm_create_requests_total") == 1
    assert delta(f"{P}_vm_create_request_duration_seconds_count") == 1
    assert delta(f"{P}_vm_create_failures_total", code="invalid_argument") == 0
    assert delta(f"{P}_vm_get_info_requests_total") == 2
    assert delta(f"{P}_vm_get_info_failures_total", code="not_found") == 1
    assert delta(f"{P}_vm_get_info_failures_total", code="permission_denied") == 1
    assert delta(f"{P}_vm_pause_failures_total", code="failed_precondition") == 1
    assert delta(f"{P}_vm_list_failures_total", code="unauthenticated") == 1
    assert delta(f"{P}_backend_operation_duration_seconds_count", backend="qemu", operation="prepare") == 1
    # issue 11: an unauthenticated scrape names no customer (per-customer series need metrics_token)
    assert after.value(f"{P}_customer_vms", customer_id=customer) == 0
    assert delta(f"{P}_vms", state="VM_STATE_CREATED") == 1


@pytest.mark.e2e
def test_boot_duration_and_active_vms(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    vm_id = rpc.create()
    before = scrape(daemon.url)
    rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True})
    running = scrape(daemon.url)
    boots = f"{P}_vm_boot_duration_seconds_count"
    assert running.value(boots, backend="qemu") - before.value(boots, backend="qemu") == 1
    boot_seconds = running.value(f"{P}_vm_boot_duration_seconds_sum", backend="qemu") - before.value(
        f"{P}_vm_boot_duration_seconds_sum", backend="qemu"
    )
    assert 0 < boot_seconds < 60
    assert running.value(f"{P}_active_vms") - before.value(f"{P}_active_vms") == 1
    assert (
        running.value(f"{P}_vms", state="VM_STATE_RUNNING")
        - before.value(f"{P}_vms", state="VM_STATE_RUNNING")
        == 1
    )
    starts = f"{P}_backend_operation_duration_seconds_count"
    assert (
        running.value(starts, backend="qemu", operation="start")
        - before.value(starts, backend="qemu", operation="start")
        == 1
    )

    rpc.ok("ShutdownVm", {"vm_id": vm_id, "force": True})
    stopped = scrape(daemon.url)
    assert stopped.value(f"{P}_active_vms") == before.value(f"{P}_active_vms")
    assert (
        stopped.value(f"{P}_vms", state="VM_STATE_SHUTDOWN")
        - before.value(f"{P}_vms", state="VM_STATE_SHUTDOWN")
        == 1
    )


def test_backend_errors_are_counted(start_daemon: StartDaemon) -> None:
    """A daemon whose QEMU binary does not exist: BootVm fails inside the backend, UNAVAILABLE (issue
    11: a host without its VMM is not the customer's fault, nor an internal error)."""
    daemon = start_daemon("nobin", "--qemu-binary", "/nonexistent")
    rpc = Rpc(daemon.url, "errs")
    vm_id = rpc.create()
    before = scrape(daemon.url)
    status, body = rpc.error("BootVm", {"vm_id": vm_id})
    assert (status, body["code"]) == (503, "unavailable")
    after = scrape(daemon.url)
    errors = f"{P}_backend_errors_total"
    assert (
        after.value(errors, backend="qemu", operation="start")
        - before.value(errors, backend="qemu", operation="start")
        == 1
    )
    assert after.value(f"{P}_vm_boot_failures_total", code="unavailable") == 1
    assert after.value(f"{P}_active_vms") == 0
    assert rpc.state(vm_id) == "VM_STATE_CREATED"
