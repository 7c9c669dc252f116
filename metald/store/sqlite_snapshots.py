"""Snapshot records on SQLite; clones are counted over vms.snapshot_id (indexed)."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from typing import Any

from metald.domain.model import VmConfig, from_dict, to_dict
from metald.domain.snapshots import PENDING_CREATING, Snapshot
from metald.store.sqlite_db import Db

_COLUMNS = (
    "seq, snapshot_id, customer_id, source_vm_id, config, created_at, size_bytes, metadata,"
    " warm_pool_size, pending, deleted"
)
_LISTED = f"customer_id = ? AND deleted = 0 AND pending != '{PENDING_CREATING}'"
_UNUSED = "deleted = 1 AND NOT EXISTS (SELECT 1 FROM vms WHERE vms.snapshot_id = snapshots.snapshot_id)"


class SqliteSnapshotRecords:
    def __init__(self, db: Db) -> None:
        self._db = db

    async def insert(self, snapshot: Snapshot) -> Snapshot:
        row = (
            snapshot.snapshot_id,
            snapshot.customer_id,
            snapshot.source_vm_id,
            json.dumps(to_dict(snapshot.config)),
            snapshot.created_at.isoformat(),
            snapshot.size_bytes,
            json.dumps(snapshot.metadata),
            snapshot.warm_pool_size,
            snapshot.pending,
            int(snapshot.deleted),
        )
        sql = (
            "INSERT INTO snapshots (snapshot_id, customer_id, source_vm_id, config, created_at, size_bytes,"
            " metadata, warm_pool_size, pending, deleted) VALUES (?,?,?,?,?,?,?,?,?,?)"
        )
        try:
            snapshot.seq = await self._db.transaction(lambda conn: int(conn.execute(sql, row).lastrowid or 0))
        except sqlite3.IntegrityError as exc:
            raise KeyError(snapshot.snapshot_id) from exc
        return snapshot

    async def get(self, snapshot_id: str) -> Snapshot | None:
        sql = f"SELECT {_COLUMNS} FROM snapshots WHERE snapshot_id = ? AND deleted = 0"
        row = await self._db.read_one(sql, (snapshot_id,))
        return _snapshot(row) if row else None

    async def save(self, snapshot: Snapshot) -> None:
        sql = "UPDATE snapshots SET size_bytes = ?, pending = ?, warm_pool_size = ? WHERE snapshot_id = ?"
        params = (snapshot.size_bytes, snapshot.pending, snapshot.warm_pool_size, snapshot.snapshot_id)
        await self._db.transaction(lambda conn: conn.execute(sql, params))

    async def list_page(self, customer_id: str, after_seq: int, limit: int) -> list[Snapshot]:
        sql = f"SELECT {_COLUMNS} FROM snapshots WHERE {_LISTED} AND seq > ? ORDER BY seq LIMIT ?"
        return [_snapshot(r) for r in await self._db.read(sql, (customer_id, after_seq, limit))]

    async def count(self, customer_id: str) -> int:
        row = await self._db.read_one(f"SELECT COUNT(*) FROM snapshots WHERE {_LISTED}", (customer_id,))
        return int(row[0]) if row else 0

    async def usage(self, customer_id: str) -> tuple[int, int]:
        sql = "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM snapshots WHERE customer_id = ? AND deleted = 0"
        row = await self._db.read_one(sql, (customer_id,))
        assert row is not None
        return int(row[0]), int(row[1])

    async def mark_deleted(self, snapshot_id: str) -> None:
        sql = "UPDATE snapshots SET deleted = 1 WHERE snapshot_id = ?"
        await self._db.transaction(lambda conn: conn.execute(sql, (snapshot_id,)))

    async def clone_count(self, snapshot_id: str) -> int:
        row = await self._db.read_one("SELECT COUNT(*) FROM vms WHERE snapshot_id = ?", (snapshot_id,))
        return int(row[0]) if row else 0

    async def unused_deleted(self) -> list[Snapshot]:
        rows = await self._db.read(f"SELECT {_COLUMNS} FROM snapshots WHERE {_UNUSED} ORDER BY seq")
        return [_snapshot(r) for r in rows]

    async def purge(self, snapshot_id: str) -> None:
        sql = "DELETE FROM snapshots WHERE snapshot_id = ?"
        await self._db.transaction(lambda conn: conn.execute(sql, (snapshot_id,)))

    async def all_snapshots(self) -> list[Snapshot]:
        return [_snapshot(r) for r in await self._db.read(f"SELECT {_COLUMNS} FROM snapshots ORDER BY seq")]


def _snapshot(row: Any) -> Snapshot:
    seq, snapshot_id, customer_id, source, config, created, size, metadata, pool, pending, deleted = row
    return Snapshot(
        snapshot_id=snapshot_id,
        customer_id=customer_id,
        source_vm_id=source,
        config=from_dict(VmConfig, json.loads(config)),
        created_at=datetime.fromisoformat(created),
        size_bytes=int(size),
        metadata=dict(json.loads(metadata)),
        warm_pool_size=int(pool),
        pending=pending,
        deleted=bool(deleted),
        seq=seq,
    )
