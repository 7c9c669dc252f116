"""A minimal Connect-JSON caller (httpx) used by tests that are not about a particular client."""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx

SERVICE = "vmprovisioner.v1.VmService"


def token(customer: str) -> str:
    return f"dev_customer_{customer}"


class Rpc:
    def __init__(self, url: str, customer: str) -> None:
        self.url = url
        self.customer = customer
        self.client = httpx.Client(base_url=url, timeout=120)

    def call(
        self, method: str, body: dict[str, Any] | None = None, *, customer: str | None = None
    ) -> httpx.Response:
        return self.client.post(
            f"/{SERVICE}/{method}",
            json=body or {},
            headers={"Authorization": f"Bearer {token(customer or self.customer)}"},
        )

    def ok(self, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        resp = self.call(method, body)
        assert resp.status_code == 200, f"{method} -> {resp.status_code} {resp.text}"
        result: dict[str, Any] = resp.json()
        return result

    def error(self, method: str, body: dict[str, Any] | None = None, **kw: Any) -> tuple[int, dict[str, Any]]:
        resp = self.call(method, body, **kw)
        assert resp.status_code != 200, f"{method} unexpectedly succeeded: {resp.text}"
        payload: dict[str, Any] = resp.json()
        return resp.status_code, payload

    def create(self, config: dict[str, Any] | None = None, **fields: Any) -> str:
        return str(self.ok("CreateVm", {"config": config or {}, **fields})["vm_id"])

    def state(self, vm_id: str) -> str:
        return str(self.ok("GetVmInfo", {"vm_id": vm_id})["state"])

    def info(self, vm_id: str) -> dict[str, Any]:
        return self.ok("GetVmInfo", {"vm_id": vm_id})

    def exec(self, vm_id: str, *argv: str) -> str:
        """ExecVm of `argv` in the guest, which must exit 0; its stdout."""
        result = self.ok("ExecVm", {"vm_id": vm_id, "command": list(argv)})
        assert result.get("exit_code", 0) == 0, result
        return base64.b64decode(result.get("stdout", "")).decode()

    def wait_state(self, vm_id: str, state: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        current = ""
        while time.monotonic() < deadline:
            current = self.state(vm_id)
            if current == state:
                return
            time.sleep(0.1)
        raise AssertionError(f"{vm_id} stayed {current}, wanted {state}")

    def delete_all(self) -> None:
        token_ = ""
        vms: list[str] = []
        while True:
            page = self.ok("ListVms", {"page_size": 1000, "page_token": token_})
            vms += [v["vm_id"] for v in page.get("vms", [])]
            token_ = page.get("next_page_token", "")
            if not token_:
                break
        for vm_id in vms:
            self.call("DeleteVm", {"vm_id": vm_id, "force": True})
