"""The embedded default store: one SQLite file (WAL, mode 0600), migrated on open."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from metald.ports import CheckResult, EventRetention
from metald.store.sqlite_db import Db
from metald.store.sqlite_events import SqliteEventLog
from metald.store.sqlite_schema import migrate
from metald.store.sqlite_snapshots import SqliteSnapshotRecords
from metald.store.sqlite_vms import SqliteVmRecords


class SqliteAddressBook:
    def __init__(self, db: Db) -> None:
        self._db = db

    async def claim_address(self, pool: str, address: str, owner: str) -> bool:
        sql = "INSERT OR IGNORE INTO addresses (pool, address, owner) VALUES (?,?,?)"
        count = await self._db.transaction(lambda conn: conn.execute(sql, (pool, address, owner)).rowcount)
        return bool(count == 1)

    async def used_addresses(self, pool: str) -> set[str]:
        rows = await self._db.read("SELECT address FROM addresses WHERE pool = ?", (pool,))
        return {str(r[0]) for r in rows}

    async def release_addresses(self, owner: str) -> None:
        await self._db.transaction(
            lambda conn: conn.execute("DELETE FROM addresses WHERE owner = ?", (owner,))
        )


class SqliteSecrets:
    def __init__(self, db: Db) -> None:
        self._db = db

    async def secret(self, name: str, make: bytes) -> bytes:
        def get_or_make(conn: sqlite3.Connection) -> bytes:
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (name, make))
            return bytes(conn.execute("SELECT value FROM meta WHERE key = ?", (name,)).fetchone()[0])

        return await self._db.transaction(get_or_make)


class SqliteStore:
    """Store on one SQLite connection; the parts share it."""

    def __init__(self, db: Db, retention: EventRetention) -> None:
        self._db = db
        self.events = SqliteEventLog(db, retention)
        self.vms = SqliteVmRecords(db, self.events)
        self.addresses = SqliteAddressBook(db)
        self.secrets = SqliteSecrets(db)
        self.snapshots = SqliteSnapshotRecords(db)

    @classmethod
    async def open(cls, path: Path, retention: EventRetention | None = None) -> SqliteStore:
        db = await Db.open(path)
        try:
            await db.run(migrate)
        except BaseException:
            await db.close()
            raise
        return cls(db, retention or EventRetention())

    async def close(self) -> None:
        await self._db.close()

    async def ping(self) -> CheckResult:
        try:
            await self._db.read_one("SELECT COUNT(*) FROM vms")
        except sqlite3.Error as exc:
            return CheckResult("unhealthy", f"sqlite: {exc}")
        return CheckResult("healthy", "sqlite")
