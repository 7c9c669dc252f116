"""The OpenAPI document: generated (never edited by hand), committed, served, and checked by
schemathesis against the running daemon: no 5xx, every response as the document describes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from metald.api.openapi import PATH, render
from tests.ops.conftest import StartDaemon
from tests.support.daemon import Daemon

ST = Path(sys.executable).parent / "st"
CHECKS = ",".join(
    [
        "not_a_server_error",
        "response_schema_conformance",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
    ]
)


def test_committed_document_is_the_generated_one() -> None:
    assert PATH.read_text() == render(), "run: .venv/bin/python -m metald.api.openapi"


def test_served_document(daemon: Daemon) -> None:
    response = httpx.get(f"{daemon.url}/openapi.json", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.json() == json.loads(PATH.read_text())
    doc = response.json()
    assert doc["openapi"] == "3.1.0"
    assert set(doc["paths"]) == {
        "/health",
        "/v1/vms",
        "/v1/vms/{vm_id}",
        "/v1/vms/{vm_id}/console",
        *(f"/v1/vms/{{vm_id}}:{verb}" for verb in ("boot", "pause", "resume", "reboot", "shutdown")),
        "/v1/vms/{vm_id}:exec",
        "/v1/vms/{vm_id}/files",
        "/v1/vms/{vm_id}:snapshot",
        "/v1/snapshots",
        "/v1/snapshots/{snapshot_id}",
    }
    files = doc["paths"]["/v1/vms/{vm_id}/files"]
    assert (files["get"]["operationId"], files["put"]["operationId"]) == ("ReadFile", "WriteFile")
    assert [p["name"] for p in files["get"]["parameters"]] == ["vm_id", "path"]
    deleted = doc["paths"]["/v1/snapshots/{snapshot_id}"]["delete"]
    assert [p["name"] for p in deleted["parameters"]] == ["snapshot_id"] and deleted["tags"] == ["Snapshots"]
    schemas = doc["components"]["schemas"]
    assert schemas["vmprovisioner.v1.MemoryConfig"]["properties"]["size_bytes"]["format"] == "int64"
    assert "VM_STATE_RUNNING" in schemas["vmprovisioner.v1.GetVmInfoResponse"]["properties"]["state"]["enum"]


def test_schemathesis_against_the_daemon(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Every operation, examples from the schema's coverage phase and fuzzing. It reuses the ids
    it gets back, so it creates, inspects and deletes real VMs; a 1 MiB per-customer memory quota
    turns every boot into a 429, so no guest runs and the run does not depend on TCG speed."""
    daemon = start_daemon("fuzz", "--network-enabled", "--max-memory-mib-per-customer", "1")
    started = time.monotonic()
    argv = [
        str(ST),
        "run",
        f"{daemon.url}/openapi.json",
        "--header",
        "Authorization: Bearer dev_customer_fuzzer",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "20",
        "--seed",
        "20250618",
        "--workers",
        "1",  # hypothesis' lambda introspection is not thread-safe on this Python
        "--request-timeout",
        "30",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path / "report"),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=tmp_path)  # its caches
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    summary = done.stdout.split("SUMMARY")[-1]
    assert "17 selected / 17 total" in done.stdout and " passed" in done.stdout and "failed" not in summary
    assert "rpc CreateVm ok" in daemon.logs()  # it got past validation, too
    assert time.monotonic() - started < 120
