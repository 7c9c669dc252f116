"""The fleet's map of snapshots: each lives on the host of its source VM, which writes its row
(as it writes its VMs'); gateways find a snapshot's host here and list snapshots over all hosts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from metald.api.convert import config_from_proto, config_to_proto
from metald.domain.errors import snapshot_not_found, snapshot_not_owned
from metald.domain.model import VmConfig
from metald.domain.snapshots import Snapshot
from metald.fleet.db import FleetDb
from metald.gen.vmprovisioner.v1 import vm_pb as pb


@dataclass(frozen=True)
class SnapshotLocation:
    snapshot_id: str
    customer_id: str
    host_id: str
    url: str
    host_live: bool
    config: VmConfig  # the source's config at the snapshot: what sizes a clone


def _row(host_id: str, s: Snapshot) -> tuple[Any, ...]:
    config = config_to_proto(s.config).to_binary()
    return (
        s.snapshot_id, s.customer_id, host_id, s.source_vm_id, s.size_bytes, s.warm_pool_size,
        json.dumps(s.metadata), config, s.created_at,
    )  # fmt: skip


async def upsert_snapshots(db: FleetDb, host_id: str, snapshots: Sequence[Snapshot]) -> None:
    """The host's records win, as for VMs."""
    if not snapshots:
        return
    async with db.connection() as conn, conn.cursor() as cursor:
        await cursor.executemany(
            """INSERT INTO fleet_snapshots (snapshot_id, customer_id, host_id, source_vm_id,
                   size_bytes, warm_pool_size, metadata, config, created_at)
               VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s)
               ON CONFLICT (snapshot_id) DO UPDATE SET customer_id = EXCLUDED.customer_id,
                   host_id = EXCLUDED.host_id, source_vm_id = EXCLUDED.source_vm_id,
                   size_bytes = EXCLUDED.size_bytes, warm_pool_size = EXCLUDED.warm_pool_size,
                   metadata = EXCLUDED.metadata, config = EXCLUDED.config,
                   created_at = EXCLUDED.created_at, updated_at = now()""",
            [_row(host_id, s) for s in snapshots],
        )


async def locate_snapshot(db: FleetDb, snapshot_id: str) -> SnapshotLocation | None:
    async with db.connection() as conn:
        cursor = await conn.execute(
            """SELECT s.customer_id, s.host_id, h.url, h.lease_until > now(), s.config
               FROM fleet_snapshots s JOIN fleet_hosts h USING (host_id) WHERE s.snapshot_id = %s""",
            (snapshot_id,),
        )
        row = await cursor.fetchone()
    if row is None:
        return None
    customer_id, host_id, url, live, config = row
    return SnapshotLocation(
        snapshot_id,
        str(customer_id),
        str(host_id),
        str(url),
        bool(live),
        config_from_proto(pb.VmConfig.from_binary(bytes(config))),
    )


async def owned_snapshot(db: FleetDb, customer_id: str, snapshot_id: str) -> SnapshotLocation:
    """The snapshot's row; NOT_FOUND / PERMISSION_DENIED with the reasons a host gives."""
    location = await locate_snapshot(db, snapshot_id)
    if location is None:
        raise snapshot_not_found(snapshot_id)
    if location.customer_id != customer_id:
        raise snapshot_not_owned(snapshot_id)
    return location


async def forget_snapshot(db: FleetDb, snapshot_id: str, host_id: str) -> None:
    async with db.connection() as conn:
        await conn.execute(
            "DELETE FROM fleet_snapshots WHERE snapshot_id = %s AND host_id = %s", (snapshot_id, host_id)
        )


def _snapshot(row: Sequence[Any]) -> Snapshot:
    snapshot_id, customer_id, source, size, warm, metadata, config, created_at, seq = row
    assert isinstance(created_at, datetime)
    return Snapshot(
        str(snapshot_id),
        str(customer_id),
        str(source),
        config_from_proto(pb.VmConfig.from_binary(bytes(config))),
        created_at,
        size_bytes=int(size),
        metadata={str(k): str(v) for k, v in dict(metadata).items()},
        warm_pool_size=int(warm),
        seq=int(seq),
    )


async def list_snapshot_page(
    db: FleetDb, customer_id: str, after_seq: int, limit: int
) -> tuple[list[Snapshot], int]:
    """One keyset page of the customer's snapshots over every host, and their fleet-wide count."""
    async with db.connection() as conn:
        cursor = await conn.execute(
            """SELECT snapshot_id, customer_id, source_vm_id, size_bytes, warm_pool_size, metadata,
                   config, created_at, seq FROM fleet_snapshots
               WHERE customer_id = %s AND seq > %s ORDER BY seq LIMIT %s""",
            (customer_id, after_seq, limit),
        )
        rows = await cursor.fetchall()
        cursor = await conn.execute(
            "SELECT count(*) FROM fleet_snapshots WHERE customer_id = %s", (customer_id,)
        )
        total = await cursor.fetchone()
    return [_snapshot(r) for r in rows], int(total[0]) if total else 0


async def record_taken(
    db: FleetDb,
    host_id: str,
    snapshot: Snapshot,
) -> None:
    """A snapshot the gateway just saw taken, listed at once with its source's config as the fleet
    knows it; the host's next heartbeat writes its own record over it."""
    async with db.connection() as conn:
        await conn.execute(
            """INSERT INTO fleet_snapshots (snapshot_id, customer_id, host_id, source_vm_id, size_bytes,
                   warm_pool_size, metadata, config, created_at)
               SELECT %s, %s, %s, %s, %s, %s, %s::jsonb, config, now() FROM fleet_vms WHERE vm_id = %s
               ON CONFLICT (snapshot_id) DO NOTHING""",
            (
                snapshot.snapshot_id, snapshot.customer_id, host_id, snapshot.source_vm_id,
                snapshot.size_bytes, snapshot.warm_pool_size, json.dumps(snapshot.metadata),
                snapshot.source_vm_id,
            ),
        )  # fmt: skip


async def customer_snapshot_usage(db: FleetDb, customer_id: str) -> tuple[int, int]:
    """How many snapshots the customer holds on all hosts, and their bytes."""
    async with db.connection() as conn:
        cursor = await conn.execute(
            "SELECT count(*), coalesce(sum(size_bytes), 0) FROM fleet_snapshots WHERE customer_id = %s",
            (customer_id,),
        )
        count, size = await cursor.fetchone() or (0, 0)
    return int(count), int(size)
