"""REST over the same service code, with curl: the reference's own example, every route, and the
same auth, error bodies and HTTP statuses as the RPCs; plus the console route's access rules."""

from __future__ import annotations

import json
import subprocess
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.support.daemon import Daemon
from tests.support.rpc import SERVICE, Rpc, token


def curl(daemon: Daemon, method: str, path: str, customer: str | None, body: Any = None) -> tuple[int, Any]:
    argv = ["curl", "-s", "-X", method, "-w", "\n%{http_code}", f"{daemon.url}{path}"]
    if customer is not None:
        argv += ["-H", f"Authorization: Bearer {token(customer)}"]
    if body is not None:
        argv += [
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body if isinstance(body, str) else json.dumps(body),
        ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    text, _, status = out.rpartition("\n")
    try:
        return int(status), json.loads(text) if text else None
    except ValueError:
        return int(status), text


def test_reference_curl_example(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    """`curl -H "Authorization: Bearer dev_customer_123" http://localhost:8080/v1/vms`."""
    assert curl(daemon, "GET", "/v1/vms", customer) == (200, {})
    vm_id = rpc.create()
    status, body = curl(daemon, "GET", "/v1/vms", customer)
    assert status == 200 and body["total_count"] == 1 and body["vms"][0]["vm_id"] == vm_id
    assert body["vms"][0]["state"] == "VM_STATE_CREATED"


def test_routes_map_onto_the_rpcs(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    status, created = curl(
        daemon, "POST", "/v1/vms", customer, {"vm_id": "rest-1", "config": {"metadata": {"via": "rest"}}}
    )
    assert (status, created) == (200, {"vm_id": "rest-1", "state": "VM_STATE_CREATED"})
    rpc.create(vm_id="rest-2")
    status, info = curl(daemon, "GET", "/v1/vms/rest-1", customer)
    assert status == 200 and info == rpc.info("rest-1")
    assert info["config"]["metadata"] == {"via": "rest"}
    # query parameters: typed from the request message (repeated enum, int32, string)
    query = "/v1/vms?state_filter=VM_STATE_CREATED&state_filter=2&page_size=1"
    status, page = curl(daemon, "GET", query, customer)
    assert status == 200 and len(page["vms"]) == 1 and page["total_count"] == 2 and page["next_page_token"]
    status, rest_of = curl(daemon, "GET", f"{query}&page_token={quote(page['next_page_token'])}", customer)
    assert [v["vm_id"] for v in page["vms"] + rest_of["vms"]] == ["rest-1", "rest-2"]
    # a verb the state forbids: the RPC's 412 and body, word for word
    status, refused = curl(daemon, "POST", "/v1/vms/rest-1:pause", customer, {})
    assert (status, refused) == rpc.error("PauseVm", {"vm_id": "rest-1"})
    assert refused["code"] == "failed_precondition"
    for verb in ("resume", "reboot", "shutdown"):
        status, body = curl(daemon, "POST", f"/v1/vms/rest-1:{verb}", customer, None)
        assert (status, body["code"]) == (412, "failed_precondition"), verb
    # the body's own fields travel too: DELETE ?force=true, shutdown {"timeout_seconds": -1}
    status, body = curl(daemon, "POST", "/v1/vms/rest-2:shutdown", customer, {"timeout_seconds": -1})
    assert (status, body["code"]) == (400, "invalid_argument") and "timeout_seconds" in body["message"]
    assert curl(daemon, "DELETE", "/v1/vms/rest-1?force=true", customer) == (200, {"success": True})
    status, gone = curl(daemon, "GET", "/v1/vms/rest-1", customer)
    assert (status, gone) == rpc.error("GetVmInfo", {"vm_id": "rest-1"})
    assert gone["code"] == "not_found" and gone["details"][0]["debug"]["reason"] == "VM_NOT_FOUND"


def test_same_auth_and_errors_as_the_rpcs(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    vm_id = rpc.create()
    status, body = curl(daemon, "GET", f"/v1/vms/{vm_id}", None)
    assert (status, body["code"]) == (401, "unauthenticated")
    unauthenticated = httpx.post(f"{daemon.url}/{SERVICE}/GetVmInfo", json={"vm_id": vm_id})
    assert (status, body) == (unauthenticated.status_code, unauthenticated.json())
    # authentication comes before the body is even parsed
    assert curl(daemon, "POST", "/v1/vms", None, "{not json")[0] == 401
    assert curl(daemon, "POST", f"/v1/vms/{vm_id}:boot", None, "[]")[0] == 401
    status, body = curl(daemon, "POST", "/v1/vms", customer, "{not json")
    assert (status, body["code"]) == (400, "invalid_argument")
    status, body = curl(daemon, "GET", "/v1/vms?page_size=abc", customer)
    assert (status, body["code"]) == (400, "invalid_argument")
    # Unknown fields are ignored, as connect-go and binary protobuf do (issue 11): a newer client
    # works against an older server.
    status, body = curl(daemon, "GET", "/v1/vms?no_such_field=1", customer)
    assert status == 200, body
    # another customer's VM: 403 with the reference's ErrorInfo
    status, body = curl(daemon, "DELETE", f"/v1/vms/{vm_id}", "x" + customer)
    assert (status, body) == rpc.error("DeleteVm", {"vm_id": vm_id}, customer="x" + customer)
    assert body["details"][0]["debug"]["metadata"] == {"vm_id": vm_id, "customer_id": "x" + customer}
    # path parameters are percent-decoded and then validated like any vm_id
    status, body = curl(daemon, "GET", "/v1/vms/a%2Fb", customer)
    assert (status, body["code"]) == (400, "invalid_argument")


def test_unknown_paths_and_methods(daemon: Daemon, customer: str) -> None:
    status, body = curl(daemon, "PUT", "/v1/vms/x", customer, {})
    assert (status, body["code"]) == (405, "unimplemented") and "DELETE, GET" in body["message"]
    assert curl(daemon, "POST", "/v1/vms/x:explode", customer, {})[0] == 405
    status, body = curl(daemon, "GET", "/v1/nothing", customer)
    assert (status, body["code"]) == (404, "not_found")


@pytest.mark.parametrize("who", ["nobody", "stranger"])
def test_console_is_for_the_owner_only(daemon: Daemon, rpc: Rpc, customer: str, who: str) -> None:
    vm_id = rpc.create()
    status, body = curl(
        daemon, "GET", f"/v1/vms/{vm_id}/console", None if who == "nobody" else "x" + customer
    )
    assert (status, body["code"]) == (
        (401, "unauthenticated") if who == "nobody" else (403, "permission_denied")
    )


def test_console_of_a_vm_that_never_ran(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    vm_id = rpc.create()
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-i",
            "-H",
            f"Authorization: Bearer {token(customer)}",
            f"{daemon.url}/v1/vms/{vm_id}/console",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.lower()
    assert out.startswith("http/1.1 200") and "x-console-offset: 0" in out and "x-console-size: 0" in out
    assert curl(daemon, "GET", "/v1/vms/not-there/console", customer)[0] == 404
    assert curl(daemon, "GET", f"/v1/vms/{vm_id}/console?offset=-1", customer)[0] == 400
    assert curl(daemon, "GET", f"/v1/vms/{vm_id}/console?limit=0", customer)[0] == 400
