"""The SQLite store's own guarantees: schema version, event in the same transaction, file modes."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from datetime import UTC, datetime
from pathlib import Path

from metald.domain.events import VmEvent, VmEventType
from metald.domain.model import Vm, VmConfig
from metald.domain.states import VmState
from metald.store.sqlite import SqliteStore
from metald.store.sqlite_schema import MIGRATIONS


async def test_new_database_is_at_the_latest_version_and_records_events(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "metald.db")
    try:
        now = datetime.now(UTC)
        vm = Vm("vm_a", "acme", VmConfig(), VmState.CREATED, now, now)
        event = VmEvent("vm_a", "acme", VmEventType.CREATED, VmState.CREATED, VmState.UNSPECIFIED, "", now)
        assert (await store.vms.insert(vm, event)).seq == 1
        assert [e.seq for e in await store.events.events_after("acme", 0, 10)] == [1]
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "metald.db")) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    for name in ("metald.db", "metald.db-wal", "metald.db-shm"):
        path = tmp_path / name
        if path.exists():
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, name
