"""gRPC server reflection on the API port: `buf curl` lists and calls the service with no proto
files and no --schema (grpc.reflection.v1, and v1alpha for older tools)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.daemon import REPO, Daemon
from tests.support.rpc import Rpc, token

BUF = REPO / "tests" / "clients" / "node_modules" / ".bin" / "buf"


def _buf(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_list_services_and_methods(daemon: Daemon) -> None:
    services = _buf("--list-services", daemon.url)
    assert services.returncode == 0, services.stderr
    assert set(services.stdout.split()) == {
        "vmprovisioner.v1.VmService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    methods = _buf("--list-methods", daemon.url)
    assert methods.returncode == 0, methods.stderr
    assert [m for m in methods.stdout.split() if m.startswith("vmprovisioner.")] == [
        f"vmprovisioner.v1.VmService/{m}"
        for m in sorted(
            [
                "CreateVm",
                "DeleteVm",
                "BootVm",
                "ShutdownVm",
                "PauseVm",
                "ResumeVm",
                "RebootVm",
                "GetVmInfo",
                "ListVms",
                # additions (issues 13 and 15)
                "SnapshotVm",
                "ListSnapshots",
                "DeleteSnapshot",
                "ExecVm",
                "WriteFile",
                "ReadFile",
                "WatchVms",
            ]
        )
    ]


@pytest.mark.parametrize("reflect_protocol", ["grpc-v1", "grpc-v1alpha"])
def test_calls_without_schema(daemon: Daemon, rpc: Rpc, customer: str, reflect_protocol: str) -> None:
    vm_id = rpc.create({"metadata": {"name": "reflected"}})
    auth = f"Authorization: Bearer {token(customer)}"
    listed = _buf(
        "--reflect-protocol", reflect_protocol, "-H", auth, f"{daemon.url}/vmprovisioner.v1.VmService/ListVms"
    )
    assert listed.returncode == 0, listed.stderr
    body = json.loads(listed.stdout)
    assert [v["vmId"] for v in body["vms"]] == [vm_id]
    assert body["vms"][0]["config"]["metadata"] == {"name": "reflected"}
    # request JSON is encoded from the reflected schema too
    got = _buf(
        "-H", auth, "-d", json.dumps({"vm_id": vm_id}), f"{daemon.url}/vmprovisioner.v1.VmService/GetVmInfo"
    )
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["state"] == "VM_STATE_CREATED"


def test_health_over_reflection(daemon: Daemon) -> None:
    checked = _buf(
        "-d", '{"service": "vmprovisioner.v1.VmService"}', f"{daemon.url}/grpc.health.v1.Health/Check"
    )
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout) == {"status": "SERVING"}
