"""Quotas and host capacity at the exact boundary: the last unit fits, one more is
RESOURCE_EXHAUSTED with an ErrorInfo naming the limit, and a refusal leaves nothing behind (no
record, no VM directory, no VMM process, no network namespace)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from metald.network.ip import netns_exists
from metald.network.names import vm_netns
from tests.conftest import serving
from tests.support.daemon import Daemon, vmm_pids
from tests.support.rpc import Rpc

MIB = 1024 * 1024
NIC = [{"interface_id": "eth0"}]


def exhausted(rpc: Rpc, method: str, body: dict[str, Any], limit: str, value: int, wanted: int) -> None:
    status, answer = rpc.error(method, body)
    assert status == 429 and answer["code"] == "resource_exhausted", answer
    info = answer["details"][0]["debug"]
    assert info["reason"] == "QUOTA_EXCEEDED"
    assert info["metadata"] == {"limit": limit, "limit_value": str(value), "requested_total": str(wanted)}


def leaves_nothing(daemon: Daemon, rpc: Rpc, vm_id: str, *, record: bool) -> None:
    vm_dir = daemon.data_dir / "vms" / vm_id
    if record:  # a refused boot: the VM stays as it was, and nothing runs for it
        assert rpc.state(vm_id) == "VM_STATE_CREATED"
        assert "process_id" not in rpc.info(vm_id).get("backend_info", {})
    else:
        assert rpc.error("GetVmInfo", {"vm_id": vm_id})[0] == 404
        assert not vm_dir.exists()
    assert vmm_pids(vm_dir) == []
    assert not netns_exists(vm_netns(vm_id))


def _daemon(tmp: Path, assets: Path, name: str, *flags: str) -> Iterator[Daemon]:
    with serving(Daemon(tmp, assets, *flags, name=name)) as d:
        yield d


@pytest.fixture(scope="module")
def count_daemon(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Iterator[Daemon]:
    yield from _daemon(
        tmp_path_factory.mktemp("quota-count"),
        assets_dir,
        "sec-qcount",
        "--max-vms-per-customer=3",
        "--max-vms=5",
    )


def test_vm_counts_per_customer_and_per_host(count_daemon: Daemon) -> None:
    a, b, c = (Rpc(count_daemon.url, f"{n}-{uuid.uuid4().hex[:6]}") for n in "abc")
    try:
        a_vms = [a.create() for _ in range(3)]  # exactly the per-customer limit
        refused = f"refused-{uuid.uuid4().hex[:8]}"
        exhausted(a, "CreateVm", {"vm_id": refused, "config": {"network": NIC}}, "max_vms_per_customer", 3, 4)
        leaves_nothing(count_daemon, a, refused, record=False)

        b.create()
        b.create()  # host: exactly 5
        for who in (b, c):
            exhausted(who, "CreateVm", {"vm_id": refused, "config": {}}, "max_vms", 5, 6)
            leaves_nothing(count_daemon, who, refused, record=False)

        a.ok("DeleteVm", {"vm_id": a_vms[0], "force": True})  # frees one place on the host
        assert c.create(vm_id=refused) == refused
    finally:
        for rpc in (a, b, c):
            rpc.delete_all()


@pytest.fixture(scope="module")
def capacity_daemon(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Iterator[Daemon]:
    """Per customer 3 vCPUs and 384 MiB; the host 4 vCPUs and 640 MiB, by overcommit ratios computed
    from this machine's cores and RAM (the daemon computes int(cores * ratio), int(ram * ratio))."""
    cores = os.cpu_count() or 1
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    yield from _daemon(
        tmp_path_factory.mktemp("quota-capacity"),
        assets_dir,
        "sec-qcap",
        "--max-vcpus-per-customer=3",
        "--max-memory-mib-per-customer=384",
        f"--vcpu-overcommit-ratio={(4 + 0.5) / cores!r}",
        f"--memory-overcommit-ratio={(640 * MIB + 0.5) / ram!r}",
    )


@pytest.mark.e2e
def test_running_vcpus_and_memory_per_customer_and_per_host(capacity_daemon: Daemon) -> None:
    a, b = (Rpc(capacity_daemon.url, f"{n}-{uuid.uuid4().hex[:6]}") for n in "ab")

    def vm(rpc: Rpc, vcpus: int, mib: int) -> str:
        return rpc.create({"cpu": {"vcpu_count": vcpus}, "memory": {"size_bytes": mib * MIB}, "network": NIC})

    def boot_refused(rpc: Rpc, vm_id: str, limit: str, value: int, wanted: int) -> None:
        exhausted(rpc, "BootVm", {"vm_id": vm_id}, limit, value, wanted)
        leaves_nothing(capacity_daemon, rpc, vm_id, record=True)

    def boot(rpc: Rpc, vcpus: int, mib: int) -> None:
        vm_id = rpc.create({"cpu": {"vcpu_count": vcpus}, "memory": {"size_bytes": mib * MIB}})
        assert rpc.ok("BootVm", {"vm_id": vm_id})["state"] == "VM_STATE_RUNNING"

    try:
        boot(a, 2, 256)
        boot_refused(a, vm(a, 2, 128), "max_vcpus_per_customer", 3, 4)
        boot_refused(a, vm(a, 1, 256), "max_memory_bytes_per_customer", 384 * MIB, 512 * MIB)
        boot(a, 1, 128)  # the customer's vCPUs and memory both exactly at the limit

        boot_refused(b, vm(b, 1, 384), "host_memory_bytes", 640 * MIB, 768 * MIB)
        boot(b, 1, 256)  # the host's vCPUs and memory both exactly at the limit
        boot_refused(b, vm(b, 1, 128), "host_vcpus", 4, 5)
    finally:
        for rpc in (a, b):
            rpc.delete_all()
