"""Through the API: a customer's subnet goes back to the pool with its last NIC VM, and the next
customer gets it (a pool of two customer networks, so reuse is forced). No guest is booted."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from metald.network import names
from tests.conftest import stop_and_sweep
from tests.reliability.host import db_rows
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

pytestmark = pytest.mark.e2e

NIC = {"network": [{"interface_id": "eth0"}]}


@pytest.fixture
def small_pool_daemon(tmp_path: Path, assets_dir: Path) -> Iterator[Daemon]:
    pools = ("--network-ipv4-pool", "10.9.0.0/23", "--network-ipv6-pool", "fd00:9::/63")
    daemon = Daemon(tmp_path / "metald", assets_dir, *pools, name="pool")
    # The daemon's host namespace exists as once a VM has booted (no guest needed for IPAM; a
    # never-booted NIC VM's delete without that namespace is a network bug of its own, issue 11).
    subprocess.run(["ip", "netns", "add", daemon.host_netns], check=True)
    daemon.start()
    try:
        yield daemon
    finally:
        stop_and_sweep(daemon)


def network_index(daemon: Daemon, customer: str) -> set[str]:
    """The customer's network index as the daemon's store records it (the API shows addresses
    only of booted VMs)."""
    rows = db_rows(daemon.data_dir, "SELECT address FROM addresses WHERE pool = ?", (f"net@{customer}",))
    return {str(r[0]) for r in rows}


def test_a_freed_subnet_serves_the_next_customer(small_pool_daemon: Daemon) -> None:
    a, b, c = (Rpc(small_pool_daemon.url, name) for name in ("pool-a", "pool-b", "pool-c"))
    a1, a2 = a.create(NIC), a.create(NIC)
    b.create(NIC)
    status, body = c.error("CreateVm", {"config": NIC})
    assert status == 429 and body["details"][0]["debug"]["reason"] == "NETWORK_POOL_EXHAUSTED", body
    a_index = network_index(small_pool_daemon, "pool-a")
    assert len(a_index) == 1
    a.ok("DeleteVm", {"vm_id": a1})
    status, _ = c.error("CreateVm", {"config": NIC})  # a2 still uses customer a's subnet
    assert status == 429
    a.ok("DeleteVm", {"vm_id": a2})
    assert network_index(small_pool_daemon, "pool-a") == set()
    c.create(NIC)
    assert network_index(small_pool_daemon, "pool-c") == a_index
    assert a.ok("ListVms", {}).get("total_count", 0) == 0


def bridges(daemon: Daemon) -> dict[str, list[str]]:
    """Customer bridges in the daemon's host namespace and their addresses."""
    out = subprocess.run(
        ["ip", "-n", daemon.host_netns, "-j", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {
        link["ifname"]: [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])]
        for link in json.loads(out)
        if link["ifname"].startswith(names.CUSTOMER_BRIDGE_PREFIX)
    }


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed")
def test_the_next_customer_of_a_subnet_gets_a_fresh_bridge(small_pool_daemon: Daemon) -> None:
    a, b, c = (Rpc(small_pool_daemon.url, name) for name in ("pool-a", "pool-b", "pool-c"))
    explicit = {
        "network": [
            {
                "interface_id": "eth0",
                "host_ipv4": {"address": "192.168.61.1", "prefix_length": 24},
                "guest_ipv4": {"address": "192.168.61.10", "prefix_length": 24},
            }
        ]
    }
    a1 = a.create(explicit)
    b.create(NIC)  # holds the pool's other network: c must get a's
    a.ok("BootVm", {"vm_id": a1})
    (bridge,) = bridges(small_pool_daemon)
    assert "192.168.61.1/24" in bridges(small_pool_daemon)[bridge]
    a.ok("DeleteVm", {"vm_id": a1, "force": True})
    assert bridges(small_pool_daemon) == {}, "the last VM's delete removes the customer's bridge"
    c1 = c.create(NIC)
    c.ok("BootVm", {"vm_id": c1})
    fresh = bridges(small_pool_daemon)
    assert list(fresh) == [bridge] and "192.168.61.1/24" not in fresh[bridge]
    c.ok("DeleteVm", {"vm_id": c1, "force": True})
