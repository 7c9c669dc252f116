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
from metald.settings import Settings
from metald.store.factory import open_store
from metald.store.memory import MemoryStore
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


async def test_everything_survives_a_reopen_and_seqs_continue(tmp_path: Path) -> None:
    path = tmp_path / "metald.db"
    now = datetime.now(UTC)
    first = await SqliteStore.open(path)
    vm = Vm("vm_a", "acme", VmConfig(), VmState.RUNNING, now, now)
    await first.vms.insert(vm, VmEvent("vm_a", "acme", VmEventType.CREATED, vm.state, vm.state, "", now))
    await first.addresses.claim_address("netid", "abcd1234", "vm_a")
    key = await first.secrets.secret("page_token_key", b"k1")
    await first.close()
    second = await SqliteStore.open(path)
    try:
        assert await second.vms.get("vm_a") == vm
        assert await second.addresses.used_addresses("netid") == {"abcd1234"}
        assert await second.secrets.secret("page_token_key", b"k2") == key
        other = Vm("vm_b", "acme", VmConfig(), VmState.CREATED, now, now)
        await second.vms.insert(
            other, VmEvent("vm_b", "acme", VmEventType.CREATED, other.state, other.state, "", now)
        )
        assert other.seq == 2
        assert [e.seq for e in await second.events.events_after("acme", 0, 10)] == [1, 2]
    finally:
        await second.close()


async def test_open_store_follows_the_store_setting(tmp_path: Path) -> None:
    memory = await open_store(Settings(data_dir=tmp_path, store="memory"))
    assert isinstance(memory, MemoryStore)
    assert not (tmp_path / "metald.db").exists()
    sqlite = await open_store(Settings(data_dir=tmp_path, event_retention_count=5))
    try:
        assert isinstance(sqlite, SqliteStore) and (tmp_path / "metald.db").exists()
    finally:
        await sqlite.close()
