"""VM records on SQLite; each change and its event are one transaction."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from metald.domain.events import VmEvent
from metald.domain.model import NicAddress, Vm, VmConfig, from_dict, to_dict
from metald.domain.states import VmState
from metald.store.sqlite_db import Db
from metald.store.sqlite_events import SqliteEventLog
from metald.store.sqlite_reads import RecordReads, bounded

_COLUMNS = "seq, vm_id, customer_id, state, config, nics, shutdown_reason, pending, created_at, updated_at, snapshot_id"


class SqliteVmRecords:
    def __init__(self, db: Db, events: SqliteEventLog) -> None:
        self._db = db
        self._events = events
        self._rows = _RowReader()
        self._reads = RecordReads()

    async def insert(self, vm: Vm, event: VmEvent) -> Vm:
        row = (
            vm.vm_id,
            vm.customer_id,
            int(vm.state),
            json.dumps(to_dict(vm.config)),
            _nics_json(vm.nics),
            vm.shutdown_reason,
            vm.pending,
            vm.config.vcpu_count,
            vm.config.memory_bytes,
            vm.created_at.isoformat(),
            vm.updated_at.isoformat(),
            vm.snapshot_id,
        )

        def insert(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO vms (vm_id, customer_id, state, config, nics, shutdown_reason, pending,"
                " vcpus, memory_bytes, created_at, updated_at, snapshot_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                row,
            )
            self._events.append(conn, event)
            return int(cur.lastrowid or 0)

        try:
            with self._reads.writing(vm.vm_id):
                vm.seq = await self._db.transaction(insert)
        except sqlite3.IntegrityError as exc:
            raise KeyError(vm.vm_id) from exc
        return vm

    async def get(self, vm_id: str) -> Vm | None:
        return await self._reads.record(vm_id, lambda: self._read(vm_id))

    async def _read(self, vm_id: str) -> Vm | None:
        row = await self._db.read_one(f"SELECT {_COLUMNS} FROM vms WHERE vm_id = ?", (vm_id,))
        return self._rows.vm(row) if row else None

    async def save(self, vm: Vm, event: VmEvent | None = None) -> None:
        params = (
            int(vm.state),
            _nics_json(vm.nics),
            vm.shutdown_reason,
            vm.pending,
            vm.updated_at.isoformat(),
            vm.vm_id,
        )
        sql = "UPDATE vms SET state=?, nics=?, shutdown_reason=?, pending=?, updated_at=? WHERE vm_id=?"
        await self._change(vm.vm_id, sql, params, event)

    async def delete(self, vm_id: str, event: VmEvent | None = None) -> None:
        await self._change(vm_id, "DELETE FROM vms WHERE vm_id = ?", (vm_id,), event)

    async def _change(self, vm_id: str, sql: str, params: Sequence[Any], event: VmEvent | None) -> None:
        """One statement on an existing record, and its event if the record was there."""

        def change(conn: sqlite3.Connection) -> None:
            if conn.execute(sql, params).rowcount and event is not None:
                self._events.append(conn, event)

        with self._reads.writing(vm_id):
            await self._db.transaction(change)

    async def list_page(
        self, customer_id: str, states: Sequence[VmState], after_seq: int, limit: int
    ) -> list[Vm]:
        where, params = _filter(customer_id, states)
        sql = f"SELECT {_COLUMNS} FROM vms WHERE {where} AND seq > ? ORDER BY seq LIMIT ?"

        async def read() -> list[Vm]:
            return [self._rows.vm(r) for r in await self._db.read(sql, (*params, after_seq, limit))]

        return await self._reads.page((customer_id, tuple(states), after_seq, limit), read)

    async def count(self, customer_id: str, states: Sequence[VmState]) -> int:
        where, params = _filter(customer_id, states)

        async def read() -> int:
            row = await self._db.read_one(f"SELECT COUNT(*) FROM vms WHERE {where}", params)
            return int(row[0]) if row else 0

        return await self._reads.count(customer_id, states, read)

    async def all_vms(self) -> list[Vm]:
        rows = await self._db.read(f"SELECT {_COLUMNS} FROM vms ORDER BY seq")
        return [self._rows.vm(r) for r in rows]

    async def state_counts(self) -> dict[tuple[str, VmState], int]:
        rows = await self._db.read("SELECT customer_id, state, COUNT(*) FROM vms GROUP BY customer_id, state")
        return {(str(c), VmState(s)): int(n) for c, s, n in rows}

    async def usage(self, customer_id: str | None, states: Sequence[VmState] = ()) -> tuple[int, int, int]:
        clauses: list[str] = []
        params: list[Any] = []
        if customer_id is not None:
            clauses.append("customer_id = ?")
            params.append(customer_id)
        if states:
            clauses.append(f"state IN ({','.join('?' * len(states))})")
            params.extend(int(s) for s in states)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT COUNT(*), COALESCE(SUM(vcpus),0), COALESCE(SUM(memory_bytes),0) FROM vms{where}"
        row = await self._db.read_one(sql, params)
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])


def _filter(customer_id: str, states: Sequence[VmState]) -> tuple[str, tuple[Any, ...]]:
    """Listing filter; VMs still being created are not listed (a failed create leaves none)."""
    where = "customer_id = ? AND pending != 'creating'"
    if not states:
        return where, (customer_id,)
    marks = ",".join("?" * len(states))
    return f"{where} AND state IN ({marks})", (customer_id, *(int(s) for s in states))


def _nics_json(nics: Sequence[NicAddress]) -> str:
    return json.dumps([to_dict(n) for n in nics])


_STATES = {int(state): state for state in VmState}


class _RowReader:
    """Rows into `Vm`s, with what never changes in a row parsed once by row seq: the config and the
    creation time (one object each per row, which the API's conversion memos rely on). A seq is
    never reused (AUTOINCREMENT), so entries need no invalidation; the size bound caps memory."""

    def __init__(self, size: int = 20_000) -> None:
        self._size = size
        self._fixed: dict[int, tuple[VmConfig, datetime]] = {}

    def fixed(self, seq: int, config: str, created: str) -> tuple[VmConfig, datetime]:
        kept = self._fixed.get(seq)
        if kept is None:
            kept = (from_dict(VmConfig, json.loads(config)), datetime.fromisoformat(created))
            bounded(self._fixed, self._size)[seq] = kept
        return kept

    def vm(self, row: Any) -> Vm:
        seq, vm_id, customer_id, state, config, nics, reason, pending, created, updated, snapshot_id = row
        fixed_config, created_at = self.fixed(seq, config, created)
        return Vm(
            vm_id=vm_id,
            customer_id=customer_id,
            config=fixed_config,
            state=_STATES[state],
            created_at=created_at,
            updated_at=datetime.fromisoformat(updated),
            nics=tuple(from_dict(NicAddress, n) for n in json.loads(nics)) if nics != "[]" else (),
            shutdown_reason=reason,
            pending=pending,
            seq=seq,
            snapshot_id=snapshot_id,
        )
