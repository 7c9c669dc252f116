"""Snapshots through the gateway. A snapshot lives on the host of its source VM: SnapshotVm goes
to that host, DeleteSnapshot to the snapshot's host (found in fleet_snapshots), ListSnapshots reads
the fleet's map (every host, one keyset order), and a clone is placed on the snapshot's host."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from metald.api.convert import state_from_proto
from metald.domain import paging
from metald.domain.errors import MetaldError
from metald.domain.model import VmConfig
from metald.domain.paging import PageTokens
from metald.domain.quotas import check_snapshot
from metald.domain.snapshots import Snapshot, check_snapshot_id
from metald.fleet import snapshot_rows
from metald.fleet.db import FleetDb
from metald.fleet.forward import HostClients
from metald.fleet.inventory import VmLocation
from metald.fleet.placement import host_unavailable
from metald.fleet.snapshot_rows import SnapshotLocation
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.usecases import SnapshotPage, SnapshotTaken

SNAPSHOT_TIMEOUT_SECONDS = 300.0  # a save copies the guest's RAM and disks
_PAGE_FILTER = "snapshots"


@dataclass(frozen=True)
class SnapshotQuota:
    """Per-customer snapshot limits over the whole fleet (0: none)."""

    count: int = 0
    bytes: int = 0


class FleetSnapshots:
    def __init__(
        self, db: FleetDb, hosts: HostClients, page_tokens: PageTokens, quota: SnapshotQuota | None = None
    ) -> None:
        self._db = db
        self._hosts = hosts
        self._tokens = page_tokens
        self._quota = quota or SnapshotQuota()

    async def _call(self, host_id: str, url: str, customer_id: str, rpc: str, request: Any, **kw: Any) -> Any:
        method = getattr(self._hosts.rpc(url), rpc)
        return await self._hosts.call(host_id, customer_id, method, request, **kw)

    async def take(
        self,
        source: VmLocation,
        snapshot_id: str,
        metadata: dict[str, str],
        warm_pool_size: int,
    ) -> SnapshotTaken:
        """SnapshotVm on the source VM's host (already routed: owned, host live), if the customer's
        snapshots on all hosts leave room for one more."""
        customer_id, vm_id = source.customer_id, source.vm_id
        if self._quota.count or self._quota.bytes:
            count, size = await snapshot_rows.customer_snapshot_usage(self._db, customer_id)
            check_snapshot(customer_id, count, size, self._quota.count, self._quota.bytes)
        request = pb.SnapshotVmRequest(
            vm_id=vm_id, snapshot_id=snapshot_id, metadata=metadata, warm_pool_size=warm_pool_size
        )
        r = await self._call(
            source.host_id, source.url, customer_id, "snapshot_vm", request, timeout=SNAPSHOT_TIMEOUT_SECONDS
        )
        snapshot = Snapshot(
            r.snapshot_id, customer_id, vm_id, VmConfig(), datetime.now(UTC), size_bytes=r.size_bytes,
            metadata=dict(metadata), warm_pool_size=warm_pool_size,
        )  # fmt: skip
        with contextlib.suppress(MetaldError):  # the host's next heartbeat records it anyway
            await snapshot_rows.record_taken(self._db, source.host_id, snapshot)
        return SnapshotTaken(snapshot, state_from_proto(r.state))

    async def clone_source(self, customer_id: str, snapshot_id: str) -> SnapshotLocation:
        """The snapshot a clone is made from, on a live host (the clone goes there)."""
        check_snapshot_id(snapshot_id)
        location = await snapshot_rows.owned_snapshot(self._db, customer_id, snapshot_id)
        if not location.host_live:
            raise host_unavailable(location.host_id)
        return location

    async def delete(self, customer_id: str, snapshot_id: str) -> None:
        location = await self.clone_source(customer_id, snapshot_id)
        request = pb.DeleteSnapshotRequest(snapshot_id=snapshot_id)
        await self._call(location.host_id, location.url, customer_id, "delete_snapshot", request)
        with contextlib.suppress(MetaldError):
            await snapshot_rows.forget_snapshot(self._db, snapshot_id, location.host_id)

    async def list(self, customer_id: str, page_size: int, page_token: str) -> SnapshotPage:
        size = paging.page_size(page_size)
        after = self._tokens.decode(page_token, customer_id, _PAGE_FILTER) if page_token else 0
        rows, total = await snapshot_rows.list_snapshot_page(self._db, customer_id, after, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        token = self._tokens.encode(customer_id, _PAGE_FILTER, rows[-1].seq) if more else ""
        return SnapshotPage(rows, token, total)
