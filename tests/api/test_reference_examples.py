"""The reference's own examples, sent with curl exactly as a user would (host paths swapped for
ones metald allows: /assets/vmlinux for /assets/vmlinux-5.10, a console file name in the VM's
directory for /tmp/vm-console.log)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.support.daemon import Daemon

pytestmark = pytest.mark.e2e

REFERENCE_CREATE = {
    "vm_id": "",
    "config": {
        "cpu": {"vcpu_count": 2, "cpu_template": "T2"},
        "memory": {"size_bytes": 1073741824},
        "boot": {
            "kernel_path": "/assets/vmlinux",
            "kernel_args": "console=ttyS0 reboot=k panic=1",
            "initrd_path": "/assets/initrd",
        },
        "storage": [
            {
                "device_id": "rootfs",
                "path_on_host": "/assets/rootfs.ext4",
                "is_read_only": False,
                "is_root_device": True,
            }
        ],
        "network": [
            {
                "interface_id": "eth0",
                "type": "TAP",
                "guest_mac": "auto",
                "rate_limit": {
                    "bandwidth_bytes_per_second": 104857600,
                    "burst_bytes": 1048576,
                    "refill_time_millis": 100,
                },
            }
        ],
        "console": {"type": "VIRTIO_CONSOLE", "output_file": "vm-console.log"},
        "metadata": {"name": "my-vm", "project": "test"},
    },
    "customer_id": "customer-123",
}


def curl(daemon: Daemon, method: str, body: dict[str, Any], customer: str) -> tuple[int, dict[str, Any]]:
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-X",
            "POST",
            f"{daemon.url}/vmprovisioner.v1.VmService/{method}",
            "-H",
            "Content-Type: application/json",
            "-H",
            f"Authorization: Bearer dev_customer_{customer}",
            "-d",
            json.dumps(body),
            "-w",
            "\n%{http_code}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    text, _, status = out.rpartition("\n")
    return int(status), json.loads(text)


def test_reference_lifecycle_with_curl(daemon: Daemon) -> None:
    customer = "customer-123"
    status, created = curl(daemon, "CreateVm", REFERENCE_CREATE, customer)
    assert status == 200, created
    vm_id = created["vm_id"]
    assert created == {"vm_id": vm_id, "state": "VM_STATE_CREATED"}
    try:
        status, booted = curl(daemon, "BootVm", {"vm_id": vm_id}, customer)
        assert (status, booted) == (200, {"success": True, "state": "VM_STATE_RUNNING"})

        status, info = curl(daemon, "GetVmInfo", {"vm_id": vm_id}, customer)
        assert status == 200
        assert set(info) >= {"vm_id", "config", "state", "metrics", "backend_info", "network_info"}
        assert info["config"]["memory"]["size_bytes"] == 1073741824  # a JSON number, as in the reference
        assert (
            info["config"]["network"][0]["rate_limit"]
            == REFERENCE_CREATE["config"]["network"][0]["rate_limit"]
        )
        assert info["config"]["metadata"] == {"name": "my-vm", "project": "test"}
        assert set(info["backend_info"]) >= {"backend_type", "process_id", "socket_path"}
        iface = info["network_info"]["interfaces"][0]
        assert set(iface) >= {"interface_id", "tap_device", "guest_mac", "host_device_name"}
        assert info["network_info"]["namespace"].startswith("ns_vm_")
        assert isinstance(info["metrics"].get("memory_usage_bytes"), int)

        status, listed = curl(
            daemon,
            "ListVms",
            {"state_filter": ["VM_STATE_RUNNING", "VM_STATE_PAUSED"], "page_size": 50, "page_token": ""},
            customer,
        )
        assert status == 200 and listed["total_count"] == 1
        assert listed["vms"][0]["vm_id"] == vm_id and listed["vms"][0]["state"] == "VM_STATE_RUNNING"
        assert listed["vms"][0]["created_at"].endswith("Z")

        assert curl(daemon, "PauseVm", {"vm_id": vm_id}, customer) == (
            200,
            {"success": True, "state": "VM_STATE_PAUSED"},
        )
        assert curl(daemon, "ResumeVm", {"vm_id": vm_id}, customer) == (
            200,
            {"success": True, "state": "VM_STATE_RUNNING"},
        )
        assert curl(daemon, "RebootVm", {"vm_id": vm_id, "force": False}, customer) == (
            200,
            {"success": True, "state": "VM_STATE_RUNNING"},
        )
        assert curl(
            daemon, "ShutdownVm", {"vm_id": vm_id, "force": False, "timeout_seconds": 30}, customer
        ) == (
            200,
            {"success": True, "state": "VM_STATE_SHUTDOWN"},
        )
        assert curl(daemon, "DeleteVm", {"vm_id": vm_id, "force": False}, customer) == (
            200,
            {"success": True},
        )
    finally:
        curl(daemon, "DeleteVm", {"vm_id": vm_id, "force": True}, customer)


def test_reference_error_body(daemon: Daemon) -> None:
    status, created = curl(daemon, "CreateVm", {"config": {}}, "customer-123")
    vm_id = created["vm_id"]
    try:
        status, body = curl(daemon, "BootVm", {"vm_id": vm_id}, "customer-456")
        assert status == 403
        assert body["code"] == "permission_denied"
        assert body["message"] == f"VM {vm_id} not found or not owned by customer"
        assert body["details"][0]["debug"] == {
            "reason": "VM_NOT_OWNED",
            "domain": "metald.unkey.com",
            "metadata": {"vm_id": vm_id, "customer_id": "customer-456"},
        }
    finally:
        curl(daemon, "DeleteVm", {"vm_id": vm_id, "force": True}, "customer-123")
