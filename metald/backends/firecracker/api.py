"""Async client of one Firecracker's REST API (HTTP/1.1 over its Unix socket)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from metald.domain.errors import ErrorCode, MetaldError, unavailable

_RETRY_INTERVAL = 0.02


@dataclass(frozen=True)
class ApiCall:
    method: str
    path: str
    body: Mapping[str, Any] | None = None


class FirecrackerApi:
    """Talks to `<socket_dir>/<name>` through /proc/self/fd/N of a directory handle.

    AF_UNIX paths are limited to 108 bytes and a VM directory may be longer; the handle is held until
    aclose().
    """

    def __init__(self, socket_dir: Path, name: str, *, timeout: float = 10.0) -> None:
        self._dir_fd = os.open(socket_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        transport = httpx.AsyncHTTPTransport(uds=f"/proc/self/fd/{self._dir_fd}/{name}")
        self._client = httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=timeout)

    async def call(self, call: ApiCall) -> Any:
        """Send one request; Firecracker's refusal (its fault_message) becomes a MetaldError."""
        try:
            response = await self._client.request(
                call.method, call.path, json=dict(call.body) if call.body is not None else None
            )
        except httpx.TransportError as exc:
            raise unavailable(
                "VMM_UNREACHABLE", f"Firecracker API unreachable for {call.method} {call.path}: {exc!r}"
            ) from exc
        if response.status_code >= 400:
            raise MetaldError(
                # 400: Firecracker refused the request (this host or this VM state cannot do it).
                ErrorCode.FAILED_PRECONDITION if response.status_code == 400 else ErrorCode.INTERNAL,
                f"Firecracker refused {call.method} {call.path}: {_fault(response)}",
                reason="VMM_REFUSED",
                metadata={"method": call.method, "path": call.path, "status": str(response.status_code)},
            )
        return response.json() if response.content else None

    async def action(self, action_type: str) -> None:
        await self.call(ApiCall("PUT", "/actions", {"action_type": action_type}))

    async def instance_state(self) -> str:
        """ "Not started", "Running" or "Paused" (GET / InstanceInfo.state)."""
        info = await self.call(ApiCall("GET", "/"))
        return str(info["state"])

    async def wait_up(self, timeout: float, alive: Callable[[], bool]) -> str:
        """Wait until the API answers (Firecracker binds it a few ms after starting); its state."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self.instance_state()
            except MetaldError as exc:
                if exc.code is not ErrorCode.UNAVAILABLE or not alive() or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(_RETRY_INTERVAL)

    async def aclose(self) -> None:
        await self._client.aclose()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1


def _fault(response: httpx.Response) -> str:
    try:
        return str(response.json()["fault_message"])
    except (ValueError, KeyError, TypeError):
        return response.text or f"HTTP {response.status_code}"
