"""SnapshotVm, clones and their deletion through the service on the Firecracker backend (jailed,
the Firecracker double playing Firecracker), with a real SQLite store and the fake network."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from metald.assets import AssetResolver
from metald.domain.model import NetworkInterface, VmConfig
from metald.domain.paging import PageTokens
from metald.domain.quotas import Quotas
from metald.domain.states import VmState
from metald.domain.validation import Defaults, Limits
from metald.ports import EventRetention
from metald.service import ServiceOptions, ServicePorts, VmService
from metald.store.sqlite import SqliteStore
from metald.testing import FakeNetwork, RecordingEvents
from tests.integration.firecracker_double import Contract, FakeFirecracker, destroy_leftovers

CUSTOMER = "acme"
NIC = VmConfig(network=(NetworkInterface(interface_id="eth0"),))


@pytest.fixture
async def service() -> AsyncIterator[tuple[VmService, Path, FakeFirecracker]]:
    root = Path(tempfile.mkdtemp(prefix="fcsvc-"))  # short: AF_UNIX paths in the double's jail
    assets = root / "assets"
    assets.mkdir()
    (assets / "vmlinux").write_bytes(b"\x7fELF kernel")
    (assets / "initrd").write_bytes(b"initrd")
    (assets / "rootfs.ext4").write_bytes(b"superblock")
    os.truncate(assets / "rootfs.ext4", 8 << 20)
    fake = FakeFirecracker.install(root / "bin")
    backend = fake.backend(root, jailed=True)
    store = await SqliteStore.open(root / "metald.db", EventRetention(count=1000))
    svc = VmService(
        ports=ServicePorts(
            store=store.vms,
            event_log=store.events,
            backend=backend,
            network=FakeNetwork(),
            assets=AssetResolver(assets),
            page_tokens=PageTokens(b"k" * 32),
            events=RecordingEvents(),
            options=ServiceOptions(
                vms_dir=root / "vms",
                limits=Limits(),
                defaults=Defaults(),
                quotas=Quotas(),
                shutdown_timeout=1,
                boot_wait_timeout=10,
                snapshots_dir=root / "snapshots",
            ),
            snapshots=store.snapshots,
        )
    )
    await svc.recover()
    try:
        yield svc, root, fake
    finally:
        await backend.close()
        await store.close()
        await destroy_leftovers(root)
        shutil.rmtree(root, ignore_errors=True)


async def test_snapshot_clone_and_delete_everything(service: tuple[VmService, Path, FakeFirecracker]) -> None:
    svc, root, fake = service
    await svc.create(CUSTOMER, "vm-src", NIC, "")
    await svc.boot(CUSTOMER, "vm-src", wait_for_ready=True, wait_timeout=10)
    taken = await svc.snapshot(CUSTOMER, "vm-src", "snap-1", {}, 0)
    assert taken.vm_state is VmState.RUNNING and taken.snapshot.size_bytes > 0
    assert [p.name for p in (root / "snapshots").iterdir()] == ["snap-1"]

    await svc.create(CUSTOMER, "vm-clone", NIC, "", snapshot_id="snap-1")
    vm = await svc.boot(CUSTOMER, "vm-clone", wait_for_ready=True, wait_timeout=1)
    assert vm.state is VmState.RUNNING
    details = await svc.info(CUSTOMER, "vm-clone")
    assert details.runtime is not None and details.runtime.guest_ready  # restored up
    loads = [r for r in fake.requests() if r["path"] == "/snapshot/load"]
    assert len(loads) == 1 and loads[0]["body"]["network_overrides"] == [
        {"iface_id": "eth0", "host_dev_name": "tap0"}
    ]
    contract = Contract()
    assert all(contract.errors(r["method"], r["path"], r["body"]) == [] for r in fake.requests())

    # A shut-down clone cold-boots its own disk.
    await svc.shutdown(CUSTOMER, "vm-clone", force=True, timeout_seconds=0)
    fake.clear()
    await svc.boot(CUSTOMER, "vm-clone", wait_for_ready=True, wait_timeout=10)
    assert ("PUT", "/actions") in fake.calls() and ("PUT", "/snapshot/load") not in fake.calls()

    await svc.delete_snapshot(CUSTOMER, "snap-1")
    assert (root / "snapshots" / "snap-1").exists()  # kept until its last clone is gone
    for vm_id in ("vm-clone", "vm-src"):
        await svc.delete(CUSTOMER, vm_id, force=True)
    assert list((root / "snapshots").iterdir()) == []
    assert list((root / "vms").iterdir()) == []
    assert not any((root / "jail").rglob("*.img"))
