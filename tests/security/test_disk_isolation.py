"""No VM can change an image another VM boots from: a writable root disk is a per-VM copy-on-write
overlay, and a read-only disk is read-only to the guest. Two real guests, through the API."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from metald.backends.qemu.agent import GuestAgent
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

pytestmark = pytest.mark.e2e

CONFIG: dict[str, Any] = {
    "boot": {"kernel_path": "/assets/vmlinux", "initrd_path": "/assets/initrd"},
    "storage": [
        {"device_id": "root", "path_on_host": "/assets/rootfs.ext4", "is_root_device": True},
        {"device_id": "data", "path_on_host": "/assets/data.ext4", "is_read_only": True},
    ],
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sh(daemon: Daemon, vm_id: str, command: str) -> tuple[int, str]:
    async def run() -> tuple[int, str]:
        agent = await GuestAgent.connect(daemon.data_dir / "vms" / vm_id)
        try:
            assert await agent.ping(30), f"{vm_id}: guest agent does not answer"
            return await agent.exec(command, timeout=60)
        finally:
            await agent.close()

    return asyncio.run(run())


@pytest.fixture
def rpc(own_daemon: Daemon) -> Iterator[Rpc]:
    client = Rpc(own_daemon.url, "cow-" + uuid.uuid4().hex[:8])
    try:
        yield client
    finally:
        client.delete_all()


def test_guest_writes_never_reach_the_shared_images(own_daemon: Daemon, own_assets: Path, rpc: Rpc) -> None:
    images = [own_assets / "rootfs.ext4", own_assets / "data.ext4"]
    before = [sha256(p) for p in images]

    writer = rpc.create(CONFIG)
    rpc.ok("BootVm", {"vm_id": writer, "wait_for_ready": True})
    marker = uuid.uuid4().hex
    rc, out = sh(
        own_daemon,
        writer,
        f"echo {marker} > /root/marker && head -c 4194304 /dev/urandom > /root/blob && sync",
    )
    assert rc == 0, out
    assert sh(own_daemon, writer, "cat /root/marker") == (0, marker)
    rc, out = sh(own_daemon, writer, "dd if=/dev/urandom of=/dev/vdb bs=4096 count=16 conv=fsync")
    assert rc != 0, f"the read-only disk took a write: {out}"

    reader = rpc.create(CONFIG)  # from the same images, while the writer still runs
    rpc.ok("BootVm", {"vm_id": reader, "wait_for_ready": True})
    rc, out = sh(own_daemon, reader, "cat /root/marker")
    assert rc != 0, f"the second VM sees the first one's file: {out}"
    assert sh(own_daemon, reader, "test -e /root/blob")[0] != 0

    for vm_id in (writer, reader):
        rpc.ok("ShutdownVm", {"vm_id": vm_id, "force": True})
    assert [sha256(p) for p in images] == before, "a guest changed a shared image"
