"""Snapshots, clones and WatchVms through the gateways of a real fleet, and the operators' view:
a clone lands on its snapshot's host and boots; ListSnapshots pages over the fleet on either
gateway; a watch sees events of VMs on several hosts and resumes exactly after its cursor;
`metalctl hosts` with the operator token; the gateway's placement, forwarding and watch series."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest

from metald.domain.events import VmEventType
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from tests.fleet.cluster import Fleet, FleetRpc
from tests.support.daemon import REPO

pytestmark = pytest.mark.e2e
READY = {"wait_for_ready": True, "wait_timeout_seconds": 90}
WATCH_METHOD = "/vmprovisioner.v1.VmService/WatchVms"


def customer() -> str:
    return "f" + uuid.uuid4().hex[:10]


def reason(response: httpx.Response) -> str:
    return str(response.json()["details"][0]["debug"]["reason"])


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if last := check():
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last})")


def host_of(rpc: FleetRpc, vm_id: str, who: str) -> str:
    return str(rpc.ok(0, "GetVmInfo", {"vm_id": vm_id}, who)["backend_info"]["host_id"])


def test_snapshot_and_clone_through_a_gateway_land_on_the_snapshots_host(fleet: Fleet) -> None:
    rpc = FleetRpc(fleet)
    who, other = customer(), customer()
    source = rpc.ok(0, "CreateVm", {"config": {}}, who)["vm_id"]
    rpc.ok(0, "BootVm", {"vm_id": source, **READY}, who)
    home = host_of(rpc, source, who)

    taken = rpc.ok(1, "SnapshotVm", {"vm_id": source, "metadata": {"role": "template"}}, who)
    snap = taken["snapshot_id"]
    assert taken["state"] == "VM_STATE_RUNNING" and int(taken["size_bytes"]) > 0
    second = rpc.ok(0, "SnapshotVm", {"vm_id": source}, who)["snapshot_id"]
    # One keyset over the fleet: page 1 on one gateway, page 2 on the other.
    first_page = rpc.ok(0, "ListSnapshots", {"page_size": 1}, who)
    assert first_page["total_count"] == 2 and len(first_page["snapshots"]) == 1
    rest = rpc.ok(1, "ListSnapshots", {"page_size": 1, "page_token": first_page["next_page_token"]}, who)
    listed = first_page["snapshots"] + rest["snapshots"]
    assert [s["snapshot_id"] for s in listed] == [snap, second] and not rest.get("next_page_token")
    assert listed[0]["source_vm_id"] == source and listed[0]["metadata"] == {"role": "template"}
    assert rpc.ok(1, "ListSnapshots", {}, other).get("snapshots", []) == []

    response = rpc.gw(1, "CreateVm", {"snapshot_id": snap}, other)
    assert (response.status_code, reason(response)) == (403, "SNAPSHOT_NOT_OWNED")
    response = rpc.gw(0, "DeleteSnapshot", {"snapshot_id": snap}, other)
    assert (response.status_code, reason(response)) == (403, "SNAPSHOT_NOT_OWNED")
    response = rpc.gw(0, "CreateVm", {"snapshot_id": "snap_nothere"}, who)
    assert (response.status_code, reason(response)) == (404, "SNAPSHOT_NOT_FOUND")

    clones = [rpc.ok(i, "CreateVm", {"snapshot_id": snap}, who)["vm_id"] for i in (0, 1)]
    for clone in clones:
        assert host_of(rpc, clone, who) == home  # the host that holds the snapshot
        assert clone in rpc.on_host(next(h for h in fleet.hosts if h.name == home), who)
    booted = rpc.ok(1, "BootVm", {"vm_id": clones[0], **READY}, who)
    assert booted["state"] == "VM_STATE_RUNNING"
    info = rpc.ok(0, "GetVmInfo", {"vm_id": clones[0]}, who)
    assert info["backend_info"]["restored_from"] == snap and info["backend_info"]["guest_ready"] == "true"

    assert rpc.ok(1, "DeleteSnapshot", {"snapshot_id": snap}, who)["success"]
    assert [s["snapshot_id"] for s in rpc.ok(0, "ListSnapshots", {}, who)["snapshots"]] == [second]
    response = rpc.gw(0, "CreateVm", {"snapshot_id": snap}, who)
    assert (response.status_code, reason(response)) == (404, "SNAPSHOT_NOT_FOUND")
    assert rpc.ok(0, "GetVmInfo", {"vm_id": clones[0]}, who)["state"] == "VM_STATE_RUNNING"
    for vm in (*clones, source):
        rpc.ok(0, "DeleteVm", {"vm_id": vm, "force": True}, who)
    rpc.ok(0, "DeleteSnapshot", {"snapshot_id": second}, who)


class Watcher:
    """A WatchVms stream through a gateway (grpcio), read by a thread into `events`."""

    def __init__(self, url: str, who: str, cursor: str = "") -> None:
        self.channel = grpc.insecure_channel(url.removeprefix("http://"))
        call = self.channel.unary_stream(
            WATCH_METHOD,
            request_serializer=lambda m: m.to_binary(),
            response_deserializer=pb.VmEvent.from_binary,
        )
        self.stream = call(
            pb.WatchVmsRequest(after_cursor=cursor),
            metadata=[("authorization", f"Bearer dev_customer_{who}")],
            timeout=180,
        )
        self.events: list[pb.VmEvent] = []
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.stream:
                self.events.append(event)
        except grpc.RpcError as exc:
            self.error = exc

    def seen(self) -> set[tuple[str, int]]:
        return {(e.vm_id, int(e.type)) for e in self.events}

    def close(self) -> None:
        self.stream.cancel()
        self.thread.join(10)
        self.channel.close()


def watch_streams(fleet: Fleet, gateway: int) -> float:
    """How many host streams the gateway holds open (its /metrics)."""
    text = httpx.get(f"{fleet.gateways[gateway].url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("unkey_metald_fleet_watch_streams{")
    )


def test_watch_through_a_gateway_sees_two_hosts_and_resumes_after_its_cursor(fleet: Fleet) -> None:
    rpc = FleetRpc(fleet)
    who = customer()
    before = rpc.ok(0, "CreateVm", {"config": {}}, who)["vm_id"]  # its CREATED precedes the watch
    live = sum(1 for h in fleet.hosts if h.proc and h.proc.poll() is None)
    first = Watcher(fleet.gateways[0].url, who)
    try:
        wait_until(lambda: watch_streams(fleet, 0) >= live, 20, "the gateway watching every host")
        created: list[str] = []
        while len({host_of(rpc, vm, who) for vm in created}) < 2:
            assert len(created) < 8, "creates never reached a second host"
            created.append(rpc.ok(1, "CreateVm", {"config": {}}, who)["vm_id"])
        wanted = {(vm, int(VmEventType.CREATED)) for vm in created}
        wait_until(lambda: wanted <= first.seen(), 30, "CREATED of VMs on two hosts")
        assert first.error is None
        assert before not in {e.vm_id for e in first.events}, "an event from before the watch"
        cursor = first.events[-1].cursor
        delivered = len(first.events)
    finally:
        first.close()
    assert cursor.startswith("fw1.") and delivered == len(created)

    # Missed while nobody watched: deletes on two hosts and a create; a resumed watch gets exactly those.
    gone = (
        created[:2]
        if host_of(rpc, created[0], who) != host_of(rpc, created[1], who)
        else [created[0], created[-1]]
    )
    for vm in gone:
        rpc.ok(0, "DeleteVm", {"vm_id": vm}, who)
    later = rpc.ok(0, "CreateVm", {"config": {}}, who)["vm_id"]
    resumed = Watcher(fleet.gateways[1].url, who, cursor)  # the cursor is good on any gateway
    try:
        missed = {(vm, int(VmEventType.DELETED)) for vm in gone}
        missed.add((later, int(VmEventType.CREATED)))
        wait_until(lambda: missed <= resumed.seen(), 30, "the events missed while away")
        time.sleep(1.0)  # anything more would have arrived by now
        assert resumed.seen() == missed and len(resumed.events) == len(missed), resumed.events
    finally:
        resumed.close()

    bad = Watcher(fleet.gateways[0].url, who, "42")  # a host's cursor is not the fleet's
    bad.thread.join(30)
    assert bad.error is not None and bad.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "after_cursor" in str(bad.error.details())
    bad.close()


def test_metalctl_hosts_and_the_gateways_series(fleet: Fleet) -> None:
    rpc = FleetRpc(fleet)
    who = customer()
    vms = [rpc.ok(i % 2, "CreateVm", {"config": {}}, who)["vm_id"] for i in range(3)]
    gateway = fleet.gateways[0].url

    def metalctl(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "from metald.cli.ctl import main; raise SystemExit(main())",
             "--url", gateway, *argv],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )  # fmt: skip

    table = metalctl("--token", fleet.operator_token, "hosts")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["HOST", "STATUS", "LEASE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {h.name for h in fleet.hosts} and all(r[1] == "live" for r in rows.values())

    def counted() -> dict[str, Any] | None:
        done = metalctl("--token", fleet.operator_token, "-o", "json", "hosts")
        assert done.returncode == 0, done.stderr
        report: dict[str, Any] = json.loads(done.stdout)
        truth = {h: len(ids) for h, ids in rpc.truth(who).items()}
        per_host = {h["host_id"]: h for h in report["hosts"]}
        # The hosts' own counts include every customer's VMs: at least ours, once reported.
        return report if all(per_host[h]["vm_count"] >= n for h, n in truth.items()) else None

    report = wait_until(counted, 10, "hosts reporting the new VMs")
    assert report["live_hosts"] == 3
    for host in report["hosts"]:
        assert (
            host["vcpus_total"] > 0 and host["memory_total_bytes"] > 0 and 0 <= host["lease_age_seconds"] < 5
        )
        assert host["url"].startswith("http://10.77.0.")
    assert metalctl("--token", f"dev_customer_{who}", "hosts").returncode == 16  # a customer's credential
    assert metalctl("hosts").returncode == 16

    metrics = httpx.get(f"{gateway}/metrics", timeout=10).text
    assert 'unkey_metald_fleet_placements_total{host_id="host' in metrics and 'outcome="placed"' in metrics
    assert "unkey_metald_fleet_placement_duration_seconds_count" in metrics
    assert 'unkey_metald_fleet_forward_duration_seconds_count{code="ok",host_id="host' in metrics
    for vm in vms:
        rpc.ok(0, "DeleteVm", {"vm_id": vm}, who)
