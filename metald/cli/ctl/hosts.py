"""`metalctl hosts`: a fleet's hosts, their leases, capacity and VM counts, from a gateway's
operator endpoint `GET /v1/fleet/hosts` (docs/fleet.md). The bearer is the operator token
(`--token`, or METALD_OPERATOR_TOKEN), not a customer's."""

from __future__ import annotations

import argparse
import os
from typing import Any

import httpx
from rich.table import Table
from rich.text import Text

from metald.cli.ctl.render import Output, header_table, human_bytes

HELP = "list a fleet's hosts: lease age, capacity, VM counts (a gateway URL and the operator token)"
PATH = "/v1/fleet/hosts"
TIMEOUT_SECONDS = 15.0
_EXIT = {"not_found": 5, "unauthenticated": 16, "unavailable": 14, "unimplemented": 12}


def _fetch(args: argparse.Namespace) -> httpx.Response:
    token = args.token or os.environ.get("METALD_OPERATOR_TOKEN", "")
    cert = (str(args.tls_cert), str(args.tls_key)) if args.tls_cert and args.tls_key else None
    verify: Any = str(args.tls_ca) if args.tls_ca else True
    with httpx.Client(timeout=TIMEOUT_SECONDS, verify=verify, cert=cert) as http:
        headers = {"Authorization": f"Bearer {token}"} if token else {}  # none: the gateway says 401
        return http.get(args.url.rstrip("/") + PATH, headers=headers)


def table(hosts: list[dict[str, Any]]) -> Table:
    out = header_table(
        ("HOST", "STATUS", "LEASE AGE", "VCPUS", "MEMORY", "VMS", "ACTIVE", "SNAPSHOTS", "URL")
    )
    for h in hosts:
        status = Text("live", style="green") if h["live"] else Text("down", style="red")
        vms_max = h["vms_max"] or "-"
        out.add_row(
            h["host_id"],
            status,
            f"{h['lease_age_seconds']:.1f}s",
            f"{h['vcpus_used']}/{h['vcpus_total']}",
            f"{human_bytes(h['memory_used_bytes'])}/{human_bytes(h['memory_total_bytes'])}",
            f"{h['vm_count']}/{vms_max}",
            str(h["vms_active"]),
            str(h["snapshot_count"]),
            h["url"],
        )
    return out


def run(args: argparse.Namespace, out: Output) -> int:
    try:
        response = _fetch(args)
    except httpx.HTTPError as exc:
        return out.failure("unavailable", f"{args.url}: {exc}", 14)
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        body = {"code": "unknown", "message": response.text[:200]}
    if response.status_code != 200:
        code = str(body.get("code", "unknown"))
        return out.failure(code, str(body.get("message", "")), _EXIT.get(code, 2))
    if out.json:
        out.emit(body)
    else:
        out.out.print(table(body["hosts"]))
    return 0
