"""A host tool that is missing is the host's problem, said clearly (issue 11), against running
daemons: without qemu-img /health is unhealthy and CreateVm (which makes the VM's overlay) is
UNAVAILABLE HOST_TOOL_MISSING naming it; without QEMU, BootVm is UNAVAILABLE HOST_TOOL_MISSING, not
INTERNAL, and nothing of the VM is lost."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.ops.conftest import StartDaemon
from tests.support.rpc import Rpc


def _reason(body: dict[str, Any]) -> str:
    return str(body["details"][0]["debug"]["reason"])


def test_missing_qemu_img_is_unhealthy_and_create_unavailable(start_daemon: StartDaemon) -> None:
    daemon = start_daemon("noimg", "--qemu-img-binary", "/nonexistent/qemu-img")
    health = httpx.get(f"{daemon.url}/health", timeout=10)
    assert (health.status_code, health.json()["status"]) == (503, "unhealthy"), health.text
    assert "qemu-img" in health.json()["checks"]["backend_ping"]["detail"]
    rpc = Rpc(daemon.url, "c" + uuid.uuid4().hex[:10])
    status, body = rpc.error("CreateVm", {"config": {}})
    assert (status, body["code"], _reason(body)) == (503, "unavailable", "HOST_TOOL_MISSING"), body
    assert "qemu-img" in body["message"]
    assert rpc.ok("ListVms").get("vms", []) == [], "a refused create leaves no VM"


def test_missing_qemu_is_unavailable_at_boot(start_daemon: StartDaemon) -> None:
    daemon = start_daemon("noqemu", "--qemu-binary", "/nonexistent/qemu-system-x86_64")
    rpc = Rpc(daemon.url, "c" + uuid.uuid4().hex[:10])
    vm_id = rpc.create()
    status, body = rpc.error("BootVm", {"vm_id": vm_id})
    assert (status, body["code"], _reason(body)) == (503, "unavailable", "HOST_TOOL_MISSING"), body
    assert "qemu-system-x86_64" in body["message"]
    assert rpc.state(vm_id) == "VM_STATE_CREATED", "the VM is kept, ready to boot once QEMU is back"
    rpc.ok("DeleteVm", {"vm_id": vm_id})
