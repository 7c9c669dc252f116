"""The fleet when things break, with real processes: the full lifecycle through a gateway over
every protocol, kill -9 of a host, kill -9 of a gateway in the middle of creates, PostgreSQL
restarted under load."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import httpx
import pytest

from metald.client import Client, NotFoundError, VmState
from tests.fleet.cluster import LEASE_SECONDS, Fleet, FleetRpc

pytestmark = pytest.mark.e2e


def customer() -> str:
    return "f" + uuid.uuid4().hex[:10]


def wait_for(check, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last})")


def reason(response: httpx.Response) -> str:
    return str(response.json()["details"][0]["debug"]["reason"])


def test_full_lifecycle_through_a_gateway_over_every_protocol(fleet: Fleet) -> None:
    rpc = FleetRpc(fleet)
    who = customer()
    url, token = fleet.gateways[1].url, f"dev_customer_{who}"
    vm = rpc.ok(0, "CreateVm", {"config": {}}, who)["vm_id"]  # Connect JSON
    with (
        Client(url, token, protocol="connect") as proto,
        Client(url, token, protocol="grpc") as grpc,
        Client(url, token, protocol="grpc-web") as web,
    ):
        assert proto.boot_vm(vm, wait_for_ready=True).state == VmState.RUNNING
        assert grpc.pause_vm(vm).state == VmState.PAUSED
        assert web.get_vm_info(vm).state == VmState.PAUSED
        assert web.resume_vm(vm).state == VmState.RUNNING
        console = proto.console(vm)  # REST, forwarded to the host
        assert console.size > 0 and console.data
        assert grpc.shutdown_vm(vm, force=True).state == VmState.SHUTDOWN
        assert rpc.ok(1, "GetVmInfo", {"vm_id": vm}, who)["state"] == "VM_STATE_SHUTDOWN"
        assert web.delete_vm(vm).success
        with pytest.raises(NotFoundError):
            grpc.get_vm_info(vm)
    assert rpc.truth(who) == {h.name: [] for h in fleet.hosts}


def test_kill_9_of_a_host(fleet: Fleet) -> None:
    rpc = FleetRpc(fleet)
    who = customer()
    created = [rpc.ok(i % 2, "CreateVm", {"config": {}}, who)["vm_id"] for i in range(6)]
    running = created[0]
    victim_name = rpc.ok(0, "GetVmInfo", {"vm_id": running}, who)["backend_info"]["host_id"]
    victim = next(h for h in fleet.hosts if h.name == victim_name)
    rpc.ok(0, "BootVm", {"vm_id": running}, who)
    on_victim = set(rpc.on_host(victim, who))
    victim.kill9()
    killed = time.monotonic()

    def host_unavailable() -> httpx.Response | None:
        response = rpc.gw(1, "GetVmInfo", {"vm_id": running}, who)
        return response if response.status_code == 503 else None

    answer = wait_for(host_unavailable, LEASE_SECONDS + 3, "HOST_UNAVAILABLE")
    assert time.monotonic() - killed <= LEASE_SECONDS + 3
    assert reason(answer) == "HOST_UNAVAILABLE"
    assert answer.json()["details"][0]["debug"]["metadata"]["host_id"] == victim_name
    # Once its lease is over: still listed, with the last known state; new VMs go to the others.
    wait_for(
        lambda: (
            rpc.http.get(f"{fleet.gateways[0].url}/health").json()["checks"]["backend_ping"]["detail"]
            == "2 of 3 hosts live"
        ),
        LEASE_SECONDS + 3,
        "the lease to lapse",
    )
    assert time.monotonic() - killed <= LEASE_SECONDS + 3
    lapsed = rpc.gw(1, "GetVmInfo", {"vm_id": running}, who)
    assert lapsed.status_code == 503 and reason(lapsed) == "HOST_UNAVAILABLE"
    listed = {vm["vm_id"]: vm["state"] for vm in rpc.ok(0, "ListVms", {}, who)["vms"]}
    assert set(created) == set(listed) and listed[running] == "VM_STATE_RUNNING"
    for i in range(4):
        vm = rpc.ok(i % 2, "CreateVm", {"config": {}}, who)["vm_id"]
        assert rpc.ok(0, "GetVmInfo", {"vm_id": vm}, who)["backend_info"]["host_id"] != victim_name
        created.append(vm)
    victim.start()
    info = wait_for(
        lambda: (r := rpc.gw(0, "GetVmInfo", {"vm_id": running}, who)).status_code == 200 and r.json(),
        LEASE_SECONDS + 5,
        "the host's VMs back",
    )
    assert info["state"] == "VM_STATE_RUNNING"  # re-adopted: its VMM ran on while the daemon was gone
    assert set(rpc.on_host(victim, who)) == on_victim
    everywhere = Counter(vm for ids in rpc.truth(who).values() for vm in ids)
    assert set(everywhere) == set(created) and set(everywhere.values()) == {1}
    assert sorted(rpc.list_all(1, who)) == sorted(created)
    rpc.ok(0, "DeleteVm", {"vm_id": running, "force": True}, who)


def test_a_host_going_down_is_seen_through_the_gateways_cache_within_the_lease(fleet: Fleet) -> None:
    rpc = FleetRpc(fleet)
    who = customer()
    vm_id = rpc.ok(0, "CreateVm", {"config": {}}, who)["vm_id"]
    for gateway in (0, 1):  # both gateways now hold the VM's location (and its host's lease)
        host_name = rpc.ok(gateway, "GetVmInfo", {"vm_id": vm_id}, who)["backend_info"]["host_id"]
    victim = next(h for h in fleet.hosts if h.name == host_name)
    victim.kill9()
    killed = time.monotonic()
    for gateway in (0, 1):
        answer = wait_for(
            lambda g=gateway: (r := rpc.gw(g, "GetVmInfo", {"vm_id": vm_id}, who)).status_code == 503 and r,
            LEASE_SECONDS + 3,
            "HOST_UNAVAILABLE through the cache",
        )
        assert reason(answer) == "HOST_UNAVAILABLE"
        assert answer.json()["details"][0]["debug"]["metadata"]["host_id"] == host_name
    assert time.monotonic() - killed <= LEASE_SECONDS + 3
    time.sleep(max(0.0, killed + LEASE_SECONDS + 1.5 - time.monotonic()))  # the lease has lapsed
    for gateway in (0, 1):
        lapsed = rpc.gw(gateway, "GetVmInfo", {"vm_id": vm_id}, who)
        assert lapsed.status_code == 503 and reason(lapsed) == "HOST_UNAVAILABLE"
    victim.start()
    for gateway in (0, 1):  # back: the renewed lease is seen at the next read of the host table
        wait_for(
            lambda g=gateway: rpc.gw(g, "GetVmInfo", {"vm_id": vm_id}, who).status_code == 200,
            LEASE_SECONDS + 5,
            "the host back through the cache",
        )
    rpc.ok(1, "DeleteVm", {"vm_id": vm_id}, who)


def test_kill_9_of_a_gateway_in_the_middle_of_creates(fleet: Fleet) -> None:
    rpc = FleetRpc(fleet)
    who = customer()
    doomed = fleet.gateways[0]
    ids = [f"gk-{uuid.uuid4().hex[:8]}-{i}" for i in range(40)]
    outcomes: dict[str, int] = {}

    def create(part: list[str]) -> None:
        client = httpx.Client(timeout=10)
        for vm_id in part:
            try:
                response = rpc.call(doomed.url, "CreateVm", {"vm_id": vm_id}, f"dev_customer_{who}")
                outcomes[vm_id] = response.status_code
            except httpx.HTTPError:
                outcomes[vm_id] = -1
        client.close()

    writers = [threading.Thread(target=create, args=(ids[i::2],)) for i in range(2)]
    for w in writers:
        w.start()
    wait_for(lambda: len(outcomes) >= 8, 20, "some creates done")
    doomed.kill9()
    for w in writers:
        w.join()
    assert any(code != 200 for code in outcomes.values()), "the gateway died after all creates"
    before = Counter(vm for vms in rpc.truth(who).values() for vm in vms)
    assert set(before.values()) <= {1}, "a create made two VMs"
    assert {vm for vm, code in outcomes.items() if code == 200} <= set(before)
    # The other gateway serves on: each retried create finds the VM or makes it, never a second one.
    for vm_id in ids:
        response = rpc.gw(1, "CreateVm", {"vm_id": vm_id}, who)
        assert response.status_code == (409 if vm_id in before else 200), (vm_id, response.text)
    after = Counter(vm for vms in rpc.truth(who).values() for vm in vms)
    assert set(after) == set(ids) and set(after.values()) == {1}
    assert sorted(rpc.list_all(1, who)) == sorted(ids)
    doomed.start()


def test_postgres_restarted_under_load(fleet: Fleet) -> None:
    rpc = FleetRpc(fleet)
    who = customer()
    gone = rpc.ok(1, "CreateVm", {"config": {}}, who)["vm_id"]
    gone_host = next(h for h in fleet.hosts if gone in rpc.on_host(h, who))
    outcomes: dict[str, int] = {}
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            vm_id = f"pg-{i}-{uuid.uuid4().hex[:6]}"
            outcomes[vm_id] = rpc.gw(i % 2, "CreateVm", {"vm_id": vm_id}, who).status_code
            i += 1

    writer = threading.Thread(target=load)
    writer.start()
    time.sleep(1)
    fleet.pg.stop("fast")
    down = rpc.gw(0, "GetVmInfo", {"vm_id": gone}, who)
    assert down.status_code == 503 and reason(down) == "FLEET_DB_UNAVAILABLE"
    # Hosts run on without the database: a VM deleted on its host meanwhile leaves the view after.
    deleted = rpc.call(gone_host.url, "DeleteVm", {"vm_id": gone}, fleet.host_token(gone_host, who))
    assert deleted.status_code == 200, deleted.text
    time.sleep(2)
    fleet.pg.start()
    wait_for(lambda: rpc.gw(0, "ListVms", {}, who).status_code == 200, 15, "the gateway recovered")
    time.sleep(1)
    stop.set()
    writer.join()
    assert set(outcomes.values()) <= {200, 503}, Counter(outcomes.values())
    assert 503 in outcomes.values() and 200 in outcomes.values()
    truth = {vm for vms in rpc.truth(who).values() for vm in vms}
    assert {vm for vm, code in outcomes.items() if code == 200} <= truth, "a confirmed VM was lost"
    wait_for(lambda: set(rpc.list_all(0, who)) == truth, 15, "the fleet view caught up")
    assert gone not in truth
