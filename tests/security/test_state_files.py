"""A running daemon keeps its state files private, also those an older release left world-readable,
and a data dir of that release opens with its VMs and its page-token key intact."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from metald.domain.paging import PageTokens
from tests.conftest import stop_and_sweep
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc
from tests.support.vmm_user import dir_the_vmm_user_enters, vmm_user_reads

DUMP = Path(__file__).parents[1] / "store" / "data" / "release_0_state.sql"
RELEASE_TOKEN_KEY = bytes(range(32))  # the page-token key stored in the dump


@pytest.fixture
def release_daemon(assets_dir: Path) -> Iterator[Daemon]:
    """A daemon on a data dir the VMM user may enter, holding the release's database left 0644."""
    data = dir_the_vmm_user_enters("metald-state-")
    with contextlib.closing(sqlite3.connect(data / "metald.db")) as db:
        db.executescript(DUMP.read_text())
    (data / "metald.db").chmod(0o644)
    assert vmm_user_reads(data / "metald.db")  # as the release left it: the check below can fail
    daemon = Daemon(data, assets_dir, "--no-network-enabled").start()
    try:
        yield daemon
    finally:
        stop_and_sweep(daemon)
        shutil.rmtree(data, ignore_errors=True)


def test_release_data_dir_opens_intact_and_private(release_daemon: Daemon) -> None:
    acme = Rpc(release_daemon.url, "acme")
    listed = acme.ok("ListVms", {})
    assert [vm["vm_id"] for vm in listed["vms"]] == [
        "vm_legacy_running",
        "vm_legacy_paused",
        "vm_legacy_shutdown",
    ]
    info = acme.info("vm_legacy_running")
    assert info["config"]["metadata"] == {"team": "blue", "purpose": "ci"}
    assert info["config"]["cpu"]["vcpu_count"] == 2
    # A page token signed with the release's key still continues the listing: the key survived.
    token = PageTokens(RELEASE_TOKEN_KEY).encode("acme", "", 1)
    page = acme.ok("ListVms", {"page_size": 10, "page_token": token})
    assert [vm["vm_id"] for vm in page["vms"]] == ["vm_legacy_paused", "vm_legacy_shutdown"]
    globex = Rpc(release_daemon.url, "globex")
    assert "vm_legacy_explicit" in {vm["vm_id"] for vm in globex.ok("ListVms", {})["vms"]}

    acme.create(vm_id="vm_after_upgrade")  # a write, so the WAL and its index exist
    for suffix in ("", "-wal", "-shm"):
        path = release_daemon.data_dir / f"metald.db{suffix}"
        info_ = os.stat(path)
        assert stat.S_IMODE(info_.st_mode) == 0o600, path
        assert info_.st_uid == os.geteuid(), path
        assert not vmm_user_reads(path), path
    acme.ok("DeleteVm", {"vm_id": "vm_after_upgrade"})
