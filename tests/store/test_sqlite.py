"""The SQLite store's own guarantees: schema version, event in the same transaction, file modes."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from metald.domain.events import VmEvent, VmEventType
from metald.domain.model import Vm, VmConfig
from metald.domain.states import VmState
from metald.settings import Settings
from metald.store.factory import open_store
from metald.store.memory import MemoryStore
from metald.store.sqlite import SqliteStore
from metald.store.sqlite_schema import MIGRATIONS
from tests.support.vmm_user import dir_the_vmm_user_enters, vmm_user_reads


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


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the VMM user may enter (pytest's tmp dirs are 0700 themselves), holding a 0644
    control file the VMM user can read, and a database an older release left world-readable."""
    data = dir_the_vmm_user_enters("metald-perm-")
    control = data / "control.txt"
    control.write_text("readable\n")
    control.chmod(0o644)
    assert vmm_user_reads(control)  # so the check below can fail
    with contextlib.closing(sqlite3.connect(data / "legacy.db")) as db:
        db.execute("CREATE TABLE t (x)")
    (data / "legacy.db").chmod(0o644)
    yield data
    shutil.rmtree(data)


def _assert_private(files: list[Path]) -> None:
    for f in files:
        info = os.stat(f)
        assert stat.S_IMODE(info.st_mode) == 0o600, f
        assert info.st_uid == os.geteuid()
        assert not vmm_user_reads(f), f


@pytest.mark.parametrize("name", ["metald.db", "legacy.db"])
async def test_state_files_are_0600_and_unreadable_by_the_vmm_user(shared_dir: Path, name: str) -> None:
    path = shared_dir / name
    store = await SqliteStore.open(path)
    try:
        now = datetime.now(UTC)
        vm = Vm("vm_a", "acme", VmConfig(), VmState.CREATED, now, now)
        await store.vms.insert(vm, VmEvent("vm_a", "acme", VmEventType.CREATED, vm.state, vm.state, "", now))
        _assert_private([path.with_name(path.name + suffix) for suffix in ("", "-wal", "-shm")])
    finally:
        await store.close()


async def test_a_record_change_whose_event_fails_is_rolled_back(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "metald.db")
    try:
        now = datetime.now(UTC)
        vm = Vm("vm_a", "acme", VmConfig(), VmState.CREATED, now, now)
        broken = VmEvent("vm_a", "acme", VmEventType.CREATED, vm.state, vm.state, "", datetime(2026, 1, 1))
        with pytest.raises(TypeError):  # a naive time cannot be stored: fails after the VM row
            await store.vms.insert(vm, broken)
        assert await store.vms.get("vm_a") is None
        good = VmEvent("vm_a", "acme", VmEventType.CREATED, vm.state, vm.state, "", now)
        await store.vms.insert(vm, good)
        with pytest.raises(TypeError):
            await store.vms.delete("vm_a", broken)
        assert await store.vms.get("vm_a") is not None
        assert [e.seq for e in await store.events.events_after("acme", 0, 10)] == [1]
    finally:
        await store.close()
