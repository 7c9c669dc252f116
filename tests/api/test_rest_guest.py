"""REST routes of the guest work and snapshot RPCs, with curl against a running daemon and a real
guest: `POST /v1/vms/{id}:exec`, `PUT`/`GET /v1/vms/{id}/files`, `POST /v1/vms/{id}:snapshot`,
`GET /v1/snapshots`, `DELETE /v1/snapshots/{id}` and `POST /v1/vms` with `snapshot_id`. Each
answers what its RPC answers (body and HTTP status), errors included."""

from __future__ import annotations

import base64
from urllib.parse import quote

import pytest

from tests.ops.test_rest import curl
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

pytestmark = pytest.mark.e2e


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def reason(body: dict[str, object]) -> object:
    details = body["details"]
    assert isinstance(details, list)
    return details[0]["debug"]["reason"]


def test_exec_files_and_snapshots_over_rest(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    vm_id = rpc.create({})
    stranger = "x" + customer

    # Before the guest runs: the RPCs' own 412, word for word.
    status, body = curl(daemon, "POST", f"/v1/vms/{vm_id}:exec", customer, {"command": ["true"]})
    assert (status, body) == rpc.error("ExecVm", {"vm_id": vm_id, "command": ["true"]})
    assert (status, body["code"]) == (412, "failed_precondition")
    status, body = curl(daemon, "POST", f"/v1/vms/{vm_id}:snapshot", customer, {})
    assert (status, body["code"]) == (412, "failed_precondition")

    rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True, "wait_timeout_seconds": 90})

    # ExecVm: argv, env, stdin and working_dir in; exit code and base64 output back.
    command = {
        "command": ["sh", "-c", 'pwd; echo "$GREETING"; cat; echo oops >&2; exit 3'],
        "env": {"GREETING": "hello"},
        "stdin": b64(b"from stdin\n"),
        "working_dir": "/tmp",
    }
    status, ran = curl(daemon, "POST", f"/v1/vms/{vm_id}:exec", customer, command)
    assert status == 200 and ran["exit_code"] == 3, ran
    assert base64.b64decode(ran["stdout"]) == b"/tmp\nhello\nfrom stdin\n"
    assert base64.b64decode(ran["stderr"]) == b"oops\n"
    status, body = curl(daemon, "POST", f"/v1/vms/{vm_id}:exec", customer, {"command": []})
    assert (status, body["code"]) == (400, "invalid_argument"), body
    status, body = curl(daemon, "POST", f"/v1/vms/{vm_id}:exec", stranger, {"command": ["true"]})
    assert (status, reason(body)) == (403, "VM_NOT_OWNED"), body

    # WriteFile with PUT, ReadFile with GET ?path=: bytes, mode and size round-trip.
    content = bytes(range(256)) * 64
    put = {"path": "/root/blob.bin", "content": b64(content), "mode": 0o600}
    assert curl(daemon, "PUT", f"/v1/vms/{vm_id}/files", customer, put) == (200, {"success": True})
    status, read = curl(daemon, "GET", f"/v1/vms/{vm_id}/files?path={quote('/root/blob.bin')}", customer)
    assert status == 200 and base64.b64decode(read["content"]) == content
    assert (read["mode"] & 0o777, int(read["size_bytes"])) == (0o600, len(content))
    status, body = curl(daemon, "GET", f"/v1/vms/{vm_id}/files?path=/no/such/file", customer)
    assert (status, body) == rpc.error("ReadFile", {"vm_id": vm_id, "path": "/no/such/file"})
    assert (status, body["code"]) == (404, "not_found")
    status, body = curl(daemon, "GET", f"/v1/vms/{vm_id}/files?path=/etc/hostname", stranger)
    assert (status, reason(body)) == (403, "VM_NOT_OWNED"), body
    status, body = curl(daemon, "PUT", f"/v1/vms/{vm_id}/files", customer, "{not json")
    assert (status, body["code"]) == (400, "invalid_argument")

    # SnapshotVm, ListSnapshots, a clone by POST /v1/vms with snapshot_id, DeleteSnapshot.
    snap = f"snap-rest-{customer}"
    taken = {"snapshot_id": snap, "metadata": {"via": "rest"}}
    status, body = curl(daemon, "POST", f"/v1/vms/{vm_id}:snapshot", customer, taken)
    assert status == 200 and body["snapshot_id"] == snap and body["state"] == "VM_STATE_RUNNING", body
    status, listed = curl(daemon, "GET", "/v1/snapshots?page_size=10", customer)
    assert status == 200 and listed == rpc.ok("ListSnapshots", {"page_size": 10})
    assert [(s["snapshot_id"], s["source_vm_id"], s["metadata"]) for s in listed["snapshots"]] == [
        (snap, vm_id, {"via": "rest"})
    ]
    assert curl(daemon, "GET", "/v1/snapshots", stranger) == (200, {})
    status, clone = curl(daemon, "POST", "/v1/vms", customer, {"snapshot_id": snap, "config": {}})
    assert status == 200 and clone["state"] == "VM_STATE_CREATED", clone
    assert rpc.info(clone["vm_id"])["config"]["memory"] == rpc.info(vm_id)["config"]["memory"]
    status, body = curl(daemon, "POST", "/v1/vms", stranger, {"snapshot_id": snap, "config": {}})
    assert (status, reason(body)) == (403, "SNAPSHOT_NOT_OWNED")
    status, body = curl(daemon, "DELETE", f"/v1/snapshots/{snap}", stranger)
    assert (status, reason(body)) == (403, "SNAPSHOT_NOT_OWNED")
    assert curl(daemon, "DELETE", f"/v1/snapshots/{snap}", customer) == (200, {"success": True})
    status, body = curl(daemon, "DELETE", f"/v1/snapshots/{snap}", customer)
    assert (status, body) == rpc.error("DeleteSnapshot", {"snapshot_id": snap})
    assert (status, reason(body)) == (404, "SNAPSHOT_NOT_FOUND")
    status, body = curl(daemon, "GET", f"/v1/snapshots/{snap}", customer)
    assert (status, body["code"]) == (405, "unimplemented")

    for vm in (clone["vm_id"], vm_id):
        assert curl(daemon, "DELETE", f"/v1/vms/{vm}?force=true", customer) == (200, {"success": True})
