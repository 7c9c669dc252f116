"""A fleet of real processes: creates spread over hosts, one ListVms over all of them, customers
kept apart across hosts, retried creates never doubled, hosts that trust only the gateway."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from metald.client import Client
from tests.fleet.cluster import Fleet, FleetRpc

pytestmark = pytest.mark.e2e


def customer() -> str:
    return "f" + uuid.uuid4().hex[:10]


def test_thirty_vms_through_both_gateways_spread_over_the_three_hosts(fleet: Fleet) -> None:
    rpc = FleetRpc(fleet)
    who = customer()
    with ThreadPoolExecutor(6) as pool:
        created = list(pool.map(lambda i: rpc.ok(i % 2, "CreateVm", {"config": {}}, who)["vm_id"], range(30)))
    assert len(set(created)) == 30
    truth = rpc.truth(who)
    assert sorted(vm for ids in truth.values() for vm in ids) == sorted(created)  # each exactly once
    per_host = {host: len(ids) for host, ids in truth.items()}
    assert len(per_host) == 3 and min(per_host.values()) >= 5, per_host
    # Either gateway lists all 30, and GetVmInfo names the host that holds each VM.
    for gateway in (0, 1):
        assert sorted(rpc.list_all(gateway, who, page_size=7)) == sorted(created)
    owner = {vm: host for host, ids in truth.items() for vm in ids}
    for vm in created[:6]:
        info = rpc.ok(1, "GetVmInfo", {"vm_id": vm}, who)
        assert info["backend_info"]["host_id"] == owner[vm]
        assert info["backend_info"]["backend_type"] == "qemu"
    page = rpc.ok(0, "ListVms", {"page_size": 4}, who)
    assert page["total_count"] == 30 and len(page["vms"]) == 4


def test_pagination_over_all_hosts_under_concurrent_creates(fleet: Fleet) -> None:
    rpc = FleetRpc(fleet)
    who = customer()
    before = {rpc.ok(i % 2, "CreateVm", {"config": {}}, who)["vm_id"] for i in range(9)}
    more: list[str] = []
    done = threading.Event()

    def create_more() -> None:
        for i in range(9):
            more.append(rpc.ok(i % 2, "CreateVm", {"config": {}}, who)["vm_id"])
        done.set()

    writer = threading.Thread(target=create_more)
    writer.start()
    seen: list[str] = []
    token = ""
    while True:  # pages alternate between gateways: the token is good on any of them
        page = rpc.ok(len(seen) % 2, "ListVms", {"page_size": 2, "page_token": token}, who)
        seen += [vm["vm_id"] for vm in page.get("vms", [])]
        token = page.get("next_page_token", "")
        if not token:
            break
    writer.join()
    assert len(seen) == len(set(seen)), "a VM was listed twice"
    assert before <= set(seen), "a VM that existed before the listing was skipped"
    assert set(seen) <= before | set(more)
    assert rpc.ok(0, "ListVms", {}, who)["total_count"] == 18


def test_customers_are_kept_apart_across_hosts(fleet: Fleet) -> None:
    rpc = FleetRpc(fleet)
    alice, mallory = customer(), customer()
    vms = [rpc.ok(i % 2, "CreateVm", {"config": {}}, alice)["vm_id"] for i in range(4)]
    assert rpc.ok(0, "ListVms", {}, mallory).get("vms", []) == []
    for vm in vms:
        for method in ("GetVmInfo", "BootVm", "DeleteVm"):
            response = rpc.gw(1, method, {"vm_id": vm}, mallory)
            assert response.status_code == 403, response.text
            assert response.json()["details"][0]["debug"]["reason"] == "VM_NOT_OWNED"
    assert sorted(rpc.list_all(0, alice)) == sorted(vms)
    # A customer may not claim another's customer_id.
    claimed = rpc.gw(0, "CreateVm", {"customer_id": alice, "config": {}}, mallory)
    assert claimed.status_code == 403


def test_a_retried_create_with_the_same_vm_id_never_makes_two(fleet: Fleet) -> None:
    rpc = FleetRpc(fleet)
    who = customer()
    vm_id = "retry-" + uuid.uuid4().hex[:8]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: rpc.gw(i % 2, "CreateVm", {"vm_id": vm_id}, who), range(8)))
    codes = Counter(a.status_code for a in answers)
    assert codes[200] == 1 and codes[409] == 7, [a.text for a in answers]
    assert [vm for ids in rpc.truth(who).values() for vm in ids] == [vm_id]
    taken = rpc.gw(1, "CreateVm", {"vm_id": vm_id}, customer())  # another customer: taken too
    assert taken.status_code == 409


def test_hosts_accept_the_gateway_only(fleet: Fleet) -> None:
    rpc = FleetRpc(fleet)
    host, other = fleet.hosts[0], fleet.hosts[1]
    direct = rpc.call(host.url, "ListVms", {}, "dev_customer_acme")
    assert direct.status_code == 401
    for_other_host = rpc.call(host.url, "ListVms", {}, fleet.tokens.mint("acme", other.name))
    assert for_other_host.status_code == 401
    assert rpc.call(host.url, "ListVms", {}, fleet.host_token(host, "acme")).status_code == 200
    # A customer's token at a gateway is a customer's; a gateway token is not accepted from outside.
    assert rpc.call(fleet.gateways[0].url, "ListVms", {}, fleet.host_token(host, "acme")).status_code == 401


def test_the_gateway_serves_health_metrics_and_quota_errors(fleet: Fleet) -> None:
    rpc = FleetRpc(fleet)
    health = rpc.http.get(f"{fleet.gateways[0].url}/health").json()
    assert health["status"] == "healthy" and health["backend"]["type"] == "fleet"
    assert health["checks"]["backend_ping"]["detail"].startswith("3 of 3 hosts live")
    rpc.ok(0, "CreateVm", {"config": {}}, customer())
    metrics = rpc.http.get(f"{fleet.gateways[0].url}/metrics").text
    assert 'unkey_metald_fleet_placements_total{host_id="host' in metrics
    assert "unkey_metald_fleet_forward_duration_seconds_count" in metrics
    assert "unkey_metald_vm_create_requests_total" in metrics
    huge = rpc.gw(0, "CreateVm", {"config": {"memory": {"size_bytes": 1 << 40}}}, customer())
    assert huge.status_code == 429, huge.text
    assert huge.json()["details"][0]["debug"]["reason"] == "FLEET_CAPACITY_EXHAUSTED"


def _read_through_both(rpc: FleetRpc, vm_id: str, who: str) -> None:
    """GetVmInfo through both gateways: each now holds the VM's location in its cache."""
    for gateway in (0, 1):
        rpc.ok(gateway, "GetVmInfo", {"vm_id": vm_id}, who)


def test_a_vm_deleted_through_one_gateway_is_not_found_through_the_other_that_cached_it(fleet: Fleet) -> None:
    rpc = FleetRpc(fleet)
    who, other = customer(), customer()
    vm_id = "cached-" + uuid.uuid4().hex[:8]
    rpc.ok(0, "CreateVm", {"vm_id": vm_id}, who)
    _read_through_both(rpc, vm_id, who)
    rpc.ok(0, "DeleteVm", {"vm_id": vm_id}, who)
    for gateway in (1, 0):
        gone = rpc.gw(gateway, "GetVmInfo", {"vm_id": vm_id}, who)
        assert gone.status_code == 404, gone.text
        assert gone.json()["details"][0]["debug"]["reason"] == "VM_NOT_FOUND"
    # The id made again by another customer: gateway 1 still remembered the first owner's location.
    rpc.ok(0, "CreateVm", {"vm_id": vm_id}, other)
    assert rpc.ok(1, "GetVmInfo", {"vm_id": vm_id}, other)["vm_id"] == vm_id
    stale = rpc.gw(1, "GetVmInfo", {"vm_id": vm_id}, who)
    assert stale.status_code == 403 and stale.json()["details"][0]["debug"]["reason"] == "VM_NOT_OWNED"
    rpc.ok(1, "DeleteVm", {"vm_id": vm_id}, other)


def test_a_customer_never_reads_another_customers_vm_through_a_cached_location(fleet: Fleet) -> None:
    rpc = FleetRpc(fleet)
    alice, mallory = customer(), customer()
    vm_id = rpc.ok(1, "CreateVm", {"config": {}}, alice)["vm_id"]
    _read_through_both(rpc, vm_id, alice)
    for gateway in (0, 1):
        for method in ("GetVmInfo", "DeleteVm", "ReadFile"):
            response = rpc.gw(gateway, method, {"vm_id": vm_id, "path": "/etc/hostname"}, mallory)
            assert response.status_code == 403, response.text
            assert response.json()["details"][0]["debug"]["reason"] == "VM_NOT_OWNED"
            assert "config" not in response.json()
    _read_through_both(rpc, vm_id, alice)  # untouched
    rpc.ok(0, "DeleteVm", {"vm_id": vm_id}, alice)


def test_get_vm_info_through_a_gateway_answers_the_same_over_every_protocol(fleet: Fleet) -> None:
    """Connect (JSON, binary) for a cached VM is the gateway's forwarding fast path
    (metald/fleet/fastpath.py), gRPC and gRPC-Web its full path: one answer, host_id included."""
    rpc = FleetRpc(fleet)
    who = customer()
    vm_id = rpc.ok(0, "CreateVm", {"config": {"metadata": {"k": "v"}}}, who)["vm_id"]
    host_id = rpc.ok(0, "GetVmInfo", {"vm_id": vm_id}, who)["backend_info"]["host_id"]  # now cached
    url, token = fleet.gateways[0].url, f"dev_customer_{who}"
    answers = {}
    for protocol in ("connect", "grpc", "grpc-web"):
        with Client(url, token, protocol=protocol) as client:
            answers[protocol] = client.get_vm_info(vm_id)
    assert answers["connect"] == answers["grpc"] == answers["grpc-web"]
    assert answers["connect"].backend_info["host_id"] == host_id
    assert dict(answers["connect"].config.metadata) == {"k": "v"}
    asked = rpc.http.post(
        f"{url}/vmprovisioner.v1.VmService/GetVmInfo",
        json={"vm_id": vm_id},
        headers={"Authorization": f"Bearer {token}", "X-Request-Id": "fast-1"},
    )
    assert asked.status_code == 200 and asked.headers["x-request-id"] == "fast-1"
    assert asked.json()["backend_info"]["host_id"] == host_id and asked.json()["vm_id"] == vm_id
    rpc.ok(0, "DeleteVm", {"vm_id": vm_id}, who)
    gone = rpc.gw(0, "GetVmInfo", {"vm_id": vm_id}, who)  # dropped from the cache: the full path
    assert gone.status_code == 404 and gone.json()["details"][0]["debug"]["reason"] == "VM_NOT_FOUND"
