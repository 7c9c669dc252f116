"""The event log on SQLite: events are appended inside the record transactions (append) and pruned
in small batches, so no write ever pays for a large delete."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

from metald.domain.events import VmEvent, VmEventType
from metald.domain.states import VmState
from metald.ports import EventRetention
from metald.store.sqlite_db import Db

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PRUNE_EVERY = 128  # events appended between two pruning batches
PRUNE_BATCH = 1024  # most rows one batch deletes


def to_micros(at: datetime) -> int:
    return (at - EPOCH) // timedelta(microseconds=1)


def from_micros(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


class SqliteEventLog:
    def __init__(self, db: Db, retention: EventRetention) -> None:
        self._db = db
        self._retention = retention

    def append(self, conn: sqlite3.Connection, event: VmEvent) -> int:
        """Write one event in the caller's transaction; returns its seq."""
        cur = conn.execute(
            "INSERT INTO events (customer_id, vm_id, type, state, previous_state, reason, at_us)"
            " VALUES (?,?,?,?,?,?,?)",
            (
                event.customer_id,
                event.vm_id,
                int(event.type),
                int(event.state),
                int(event.previous_state),
                event.reason,
                to_micros(event.at),
            ),
        )
        seq = int(cur.lastrowid or 0)
        if seq % PRUNE_EVERY == 0:
            self._prune_batch(conn)
        return seq

    async def events_after(self, customer_id: str, after_seq: int, limit: int) -> list[VmEvent]:
        rows = await self._db.read(
            "SELECT seq, customer_id, vm_id, type, state, previous_state, reason, at_us FROM events"
            " WHERE customer_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (customer_id, after_seq, limit),
        )
        return [
            VmEvent(
                vm_id=vm_id,
                customer_id=customer,
                type=VmEventType(kind),
                state=VmState(state),
                previous_state=VmState(previous),
                reason=reason,
                at=from_micros(at_us),
                seq=seq,
            )
            for seq, customer, vm_id, kind, state, previous, reason, at_us in rows
        ]

    async def first_seq(self) -> int:
        row = await self._db.read_one("SELECT COALESCE(MIN(seq), 0) FROM events")
        return int(row[0]) if row else 0

    async def last_seq(self) -> int:
        # AUTOINCREMENT keeps the highest seq ever handed out, also once pruned away.
        row = await self._db.read_one("SELECT seq FROM sqlite_sequence WHERE name = 'events'")
        return int(row[0]) if row else 0

    async def prune(self) -> int:
        dropped = 0
        while True:
            batch = await self._db.transaction(self._prune_batch)
            dropped += batch
            if batch < PRUNE_BATCH:
                return dropped

    def _prune_batch(self, conn: sqlite3.Connection) -> int:
        """Drop up to PRUNE_BATCH of the oldest events beyond the retention; the newest event is
        always kept, so first_seq and last_seq stay meaningful."""
        keep_from = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
        limit_seq = keep_from - self._retention.count
        cutoff = 0
        if self._retention.max_age_seconds > 0:
            cutoff = to_micros(datetime.now(UTC)) - int(self._retention.max_age_seconds * 1e6)
        cur = conn.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE seq < ? AND (seq <= ? OR at_us < ?)"
            " ORDER BY seq LIMIT ?)",
            (keep_from, limit_seq, cutoff, PRUNE_BATCH),
        )
        return int(cur.rowcount)
