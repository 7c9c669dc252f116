"""Snapshot RPCs through the async SDK (the sync one is driven by `metalctl snapshot`, see
test_cli_events.py): refusals with their codes and reasons, and on a real guest a snapshot, its
listing and a clone restored from it."""

from __future__ import annotations

import pytest

from metald.client import (
    AsyncClient,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    VmState,
)
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc, token


async def test_snapshot_refusals(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    async with AsyncClient(daemon.url, token(customer)) as client:
        assert (await client.list_snapshots()).total_count == 0
        assert [s async for s in client.iter_snapshots()] == []
        with pytest.raises(NotFoundError) as missing:
            await client.delete_snapshot("snap_nope")
        assert missing.value.reason == "SNAPSHOT_NOT_FOUND"
        with pytest.raises(NotFoundError):
            await client.create_vm(snapshot_id="snap_nope")
        created = (await client.create_vm()).vm_id
        with pytest.raises(FailedPreconditionError):  # only RUNNING or PAUSED VMs
            await client.snapshot_vm(created)


@pytest.mark.e2e
async def test_snapshot_and_clone_through_the_async_sdk(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    async with AsyncClient(daemon.url, token(customer), protocol="grpc") as client:
        source = (await client.create_vm({"metadata": {"name": "template"}})).vm_id
        await client.boot_vm(source, wait_for_ready=True, wait_timeout_seconds=90)
        taken = await client.snapshot_vm(source, metadata={"role": "t"})
        try:
            assert taken.snapshot_id.startswith("snap_") and taken.state == VmState.RUNNING
            listed = [s async for s in client.iter_snapshots(page_size=1)]
            assert [(s.snapshot_id, s.source_vm_id, dict(s.metadata)) for s in listed] == [
                (taken.snapshot_id, source, {"role": "t"})
            ]
            with pytest.raises(InvalidArgumentError) as refused:
                await client.create_vm({"cpu": {"vcpu_count": 2}}, snapshot_id=taken.snapshot_id)
            assert refused.value.metadata["field"] == "config.cpu.vcpu_count"
            async with AsyncClient(daemon.url, token("x" + customer)) as stranger:
                with pytest.raises(PermissionDeniedError) as denied:
                    await stranger.create_vm(snapshot_id=taken.snapshot_id)
                assert denied.value.reason == "SNAPSHOT_NOT_OWNED"
            clone = (await client.create_vm(snapshot_id=taken.snapshot_id)).vm_id
            booted = await client.boot_vm(clone, wait_for_ready=True, wait_timeout_seconds=90)
            assert booted.state == VmState.RUNNING
            info = await client.get_vm_info(clone)
            assert info.backend_info["restored_from"] == taken.snapshot_id
            assert (await client.exec_vm(clone, ["cat", "/proc/sys/kernel/hostname"])).exit_code == 0
        finally:
            assert (await client.delete_snapshot(taken.snapshot_id)).success
        assert (await client.list_snapshots()).total_count == 0
