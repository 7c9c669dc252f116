"""A data dir written by the release before schema versions opens with everything intact.

tests/store/data/release_0_state.sql is the dump of a database made by that release's own code
(VMs of two customers with auto and explicit NICs, their address claims, the page-token key).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from metald.cli.daemon import main
from metald.domain.events import VmEvent, VmEventType
from metald.domain.model import IpConfig, NetworkInterface, Vm, VmConfig
from metald.domain.states import VmState
from metald.network.ipam import Ipam
from metald.network.plan import plan_vm
from metald.store.sqlite import SqliteStore
from metald.store.sqlite_schema import MIGRATIONS, SchemaTooNewError

DUMP = Path(__file__).parent / "data" / "release_0_state.sql"
WRITTEN = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)


def release_database(path: Path) -> Path:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(DUMP.read_text())
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    return path


def user_version(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


async def test_release_database_opens_with_every_vm_address_and_key(tmp_path: Path) -> None:
    path = release_database(tmp_path / "metald.db")
    store = await SqliteStore.open(path)
    try:
        vms = {vm.vm_id: vm for vm in await store.vms.all_vms()}
        assert list(vms) == [
            "vm_legacy_running",
            "vm_legacy_paused",
            "vm_legacy_shutdown",
            "vm_legacy_explicit",
            "vm_legacy_deleting",
        ]
        running = vms["vm_legacy_running"]
        assert (running.customer_id, running.state, running.seq) == ("acme", VmState.RUNNING, 1)
        assert (running.config.vcpu_count, running.config.memory_bytes) == (2, 512 << 20)
        assert running.config.metadata == {"team": "blue", "purpose": "ci"}
        assert running.config.network[0].rate_limit is not None
        assert running.nics[0].guest_ipv4 == "10.240.173.2/24" and running.created_at == WRITTEN
        assert vms["vm_legacy_paused"].state is VmState.PAUSED
        assert vms["vm_legacy_shutdown"].shutdown_reason == "guest_poweroff"
        assert vms["vm_legacy_deleting"].pending == "deleting"
        explicit = vms["vm_legacy_explicit"]
        assert explicit.config.network[0].host_ipv4 == IpConfig("192.168.50.1", 24)
        assert explicit.nics[0].mac == "02:aa:bb:cc:dd:01"
        assert await store.vms.usage("acme") == (3, 5, (512 + 512 + 128) << 20)
        assert all(vm.snapshot_id == "" for vm in vms.values())  # a column the release did not have
        assert await store.snapshots.count("acme") == 0

        book = store.addresses
        assert await book.used_addresses("netindex") == {"173", "141"}
        assert await book.used_addresses("ipv4@acme") == {"10.240.173.2", "10.240.173.3"}
        assert await book.used_addresses("hostnet") == {"192.168.50.0/24"}
        assert await book.used_addresses("gw@globex") == {"192.168.50.1"}
        assert await store.secrets.secret("page_token_key", b"new") == bytes(range(32))

        # New writes continue after the release's: seqs (a deleted VM had 6), events, IPAM.
        vm = Vm("vm_after", "acme", VmConfig(network=(NetworkInterface("eth0", "TAP", "auto"),)),
                VmState.CREATED, WRITTEN, WRITTEN)  # fmt: skip
        created = VmEvent("vm_after", "acme", VmEventType.CREATED, vm.state, vm.state, "", WRITTEN)
        assert (await store.vms.insert(vm, created)).seq == 7
        assert [e.vm_id for e in await store.events.events_after("acme", 0, 10)] == ["vm_after"]
        ipam = Ipam(store.addresses, "10.240.0.0/16", "fd6d:6574:616c::/48")
        assert (await ipam.customer_network("acme")).index == 173
        (nic,) = await plan_vm(ipam, vm)
        assert nic.guest_ipv4 == "10.240.173.4/24"  # .2 and .3 are still the release's VMs'
    finally:
        await store.close()
    assert user_version(path) == len(MIGRATIONS)


async def test_migrations_are_idempotent(tmp_path: Path) -> None:
    path = release_database(tmp_path / "metald.db")
    await (await SqliteStore.open(path)).close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 0")  # as if every migration had to run again
    store = await SqliteStore.open(path)
    try:
        assert len(await store.vms.all_vms()) == 5
        assert await store.secrets.secret("page_token_key", b"") == bytes(range(32))
    finally:
        await store.close()
    assert user_version(path) == len(MIGRATIONS)


async def test_a_database_from_a_newer_metald_is_refused_untouched(tmp_path: Path) -> None:
    path = release_database(tmp_path / "metald.db")
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(SchemaTooNewError):
        await SqliteStore.open(path)
    assert user_version(path) == len(MIGRATIONS) + 1


def test_the_daemon_refuses_a_newer_schema_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # main() installs the daemon's process-wide child watcher; in this test process it would
    # stay behind and break every later test that starts a subprocess on another event loop.
    monkeypatch.setattr(asyncio, "set_child_watcher", lambda watcher: None)
    path = release_database(tmp_path / "metald.db")
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 99")
    assert main(["serve", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0"]) == 2
    assert "schema version 99" in capsys.readouterr().err
    assert user_version(path) == 99
