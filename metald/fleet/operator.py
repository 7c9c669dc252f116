"""The operators' view of a fleet, on the gateway: `GET /v1/fleet/hosts` with the operator token
(`fleet_operator_token_file`) as bearer. It lists every host with its lease, capacity and VM
counts (`metalctl hosts`). Customers' credentials never open it; without the setting it is off."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from metald.api.asgi import ASGIApp, Receive, Scope, Send, send_json
from metald.api.auth import ConfigError
from metald.domain.errors import MetaldError
from metald.domain.states import ACTIVE_STATES
from metald.fleet import inventory
from metald.fleet.db import FleetDb

HOSTS_PATH = "/v1/fleet/hosts"
MIN_TOKEN_BYTES = 16


def load_operator_token(path: Path | None) -> bytes:
    """The operator token from its file (surrounding whitespace ignored); b"" when unset."""
    if path is None:
        return b""
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"fleet_operator_token_file: {exc}") from None
    if len(token) < MIN_TOKEN_BYTES or b" " in token:
        raise ConfigError(f"fleet_operator_token_file {path}: at least {MIN_TOKEN_BYTES} bytes, no spaces")
    return token


async def hosts_report(db: FleetDb) -> dict[str, Any]:
    rows = await inventory.hosts(db)
    counts = await inventory.host_counts(db, sorted(ACTIVE_STATES))
    hosts = []
    for h in rows:
        listed, active, snapshots = counts.get(h.host_id, (0, 0, 0))
        c = h.capacity
        hosts.append(
            {
                "host_id": h.host_id,
                "url": h.url,
                "live": h.live,
                "lease_age_seconds": round(h.lease_age_seconds, 3),
                "vcpus_total": c.vcpus_total,
                "vcpus_used": c.vcpus_used,
                "memory_total_bytes": c.memory_total,
                "memory_used_bytes": c.memory_used,
                "vms_max": c.vms_max,
                "vm_count": c.vm_count,  # as the host last reported
                "vms_listed": listed,  # in the fleet view now
                "vms_active": active,  # RUNNING or PAUSED in the fleet view
                "snapshot_count": snapshots,
            }
        )
    return {"hosts": hosts, "live_hosts": sum(h.live for h in rows)}


class OperatorApi:
    """Serves HOSTS_PATH in front of the gateway's API app; everything else goes to `app`."""

    def __init__(self, app: ASGIApp, db: FleetDb, token: bytes) -> None:
        self._app = app
        self._db = db
        self._auth = b"Bearer " + token if token else b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != HOSTS_PATH:
            await self._app(scope, receive, send)
            return
        if not self._auth:
            message = "the operator API is off: set fleet_operator_token_file on the gateway"
            await send_json(send, 404, {"code": "not_found", "message": message})
            return
        given = next((v for k, v in scope.get("headers", []) if k.lower() == b"authorization"), b"")
        if not hmac.compare_digest(bytes(given), self._auth):
            message = "the operator token (Authorization: Bearer ...) is missing or wrong"
            await send_json(send, 401, {"code": "unauthenticated", "message": message})
            return
        if scope["method"] not in ("GET", "HEAD"):
            await send_json(send, 405, {"code": "unimplemented", "message": f"{HOSTS_PATH} takes GET"})
            return
        try:
            report = await hosts_report(self._db)
        except MetaldError as exc:
            await send_json(send, 503, {"code": "unavailable", "message": exc.message, "reason": exc.reason})
            return
        await send_json(send, 200, report)
