"""SnapshotVm, ListSnapshots, DeleteSnapshot, and the snapshot side of clones.

A snapshot is taken in steps that a daemon killed halfway finishes or undoes (recovery.py): the
record is inserted pending, the source VM marked SNAPSHOTTING, the backend writes the files into a
temporary directory that is renamed into place, then both marks are cleared. Files of a deleted
snapshot stay until no VM was cloned from it any more (`purge_unused_snapshots`).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

from metald.domain import paging
from metald.domain.errors import (
    MetaldError,
    conflict,
    invalid,
    precondition,
    snapshot_not_found,
    snapshot_not_owned,
)
from metald.domain.model import Vm
from metald.domain.pending import PendingOp
from metald.domain.quotas import check_snapshot
from metald.domain.snapshots import PENDING_CREATING, Snapshot, check_snapshot_id, new_snapshot_id
from metald.domain.states import ACTIVE_STATES, VmState
from metald.domain.validation import validate_metadata
from metald.ports import SnapshotRecords
from metald.service.base import ServiceBase
from metald.usecases import SnapshotPage, SnapshotTaken

log = logging.getLogger("metald.service")

_PAGE_FILTER = "snapshots"
TEMP_PREFIX = ".tmp-"
CLONE_AGENT_TIMEOUT = 10.0


class Snapshots(ServiceBase):
    def _snapshot_store(self) -> tuple[SnapshotRecords, Path]:
        """The records and the files' directory; FAILED_PRECONDITION where snapshots are off."""
        caps = self._backend.capabilities
        if self._snapshots is None or self._opts.snapshots_dir is None or not caps.supports_snapshots:
            message = f"the {caps.backend_type} backend on this host takes no snapshots"
            raise precondition("SNAPSHOTS_UNSUPPORTED", message, backend=caps.backend_type)
        return self._snapshots, self._opts.snapshots_dir

    def _snapshot_dir(self, snapshot_id: str) -> Path:
        _, root = self._snapshot_store()
        return root / snapshot_id

    async def _owned_snapshot(self, customer_id: str, snapshot_id: str) -> Snapshot:
        records, _ = self._snapshot_store()
        check_snapshot_id(snapshot_id)
        snapshot = await records.get(snapshot_id)
        if snapshot is None or snapshot.pending:
            raise snapshot_not_found(snapshot_id)
        if snapshot.customer_id != customer_id:
            raise snapshot_not_owned(snapshot_id)
        return snapshot

    async def _check_snapshot_quota(self, records: SnapshotRecords, customer_id: str) -> None:
        count, size = await records.usage(customer_id)
        limit, bytes_limit = self._opts.max_snapshots_per_customer, self._opts.max_snapshot_bytes_per_customer
        check_snapshot(customer_id, count, size, limit, bytes_limit)

    # ---- SnapshotVm ----

    async def snapshot(
        self, customer_id: str, vm_id: str, snapshot_id: str, metadata: dict[str, str], warm_pool_size: int
    ) -> SnapshotTaken:
        records, root = self._snapshot_store()
        snapshot_id = check_snapshot_id(snapshot_id) if snapshot_id else new_snapshot_id()
        validate_metadata(metadata, self._opts.limits, field="metadata")
        if warm_pool_size > self._opts.max_warm_pool_size:
            raise invalid("warm_pool_size", f"at most {self._opts.max_warm_pool_size} on this host")
        await self._owned(customer_id, vm_id)
        async with self._vm_lock(vm_id):
            vm = await self._owned(customer_id, vm_id)
            if vm.state not in ACTIVE_STATES or vm.pending:
                state = vm.state.api_name
                message = f"VM {vm_id} is {state}; only a RUNNING or PAUSED VM can be snapshotted"
                raise precondition("INVALID_STATE", message, vm_id=vm_id, state=state)
            await self._require_disk_room()
            await self._check_snapshot_quota(records, customer_id)
            now = datetime.now(UTC)
            record = Snapshot(
                snapshot_id, customer_id, vm_id, vm.config, now, metadata=dict(metadata),
                warm_pool_size=warm_pool_size, pending=PENDING_CREATING,
            )  # fmt: skip
            try:
                record = await records.insert(record)
            except KeyError:
                message = f"snapshot {snapshot_id} already exists"
                raise conflict("SNAPSHOT_EXISTS", message, snapshot_id=snapshot_id) from None
            temp = root / f"{TEMP_PREFIX}{snapshot_id}"
            try:
                await asyncio.to_thread(root.mkdir, mode=0o700, parents=True, exist_ok=True)
                await self._records.begin(vm, PendingOp.SNAPSHOTTING)
                result = await self._backend_call("snapshot", lambda: self._backend.snapshot(vm_id, temp))
                await asyncio.to_thread(temp.rename, root / snapshot_id)
                record.size_bytes, record.pending = result.size_bytes, ""
                await records.save(record)
            except BaseException:
                await asyncio.to_thread(shutil.rmtree, temp, True)
                await records.purge(snapshot_id)
                raise
            finally:
                await self._records.settle(vm, vm.state)
            self._events.snapshot_taken(self.backend_type, result.paused_seconds)
            log.info(
                "snapshot %s of %s: %d bytes, guest paused %.1f ms",
                snapshot_id, vm_id, result.size_bytes, result.paused_seconds * 1000,
                extra={"vm_id": vm_id},
            )  # fmt: skip
        await self._snapshot_added(record)
        return SnapshotTaken(record, vm.state)

    async def _snapshot_added(self, snapshot: Snapshot) -> None:
        """A snapshot was taken (its warm pool starts filling: pool.py)."""

    async def _snapshot_removed(self, snapshot_id: str) -> None:
        """A snapshot was deleted (its warm pool stops: pool.py)."""

    async def _refresh_clone(self, vm: Vm) -> None:
        """Right after a restore: the clone's own clock, entropy and identity (guestwork.py). A
        guest without a working agent keeps its snapshot's; that is logged, not a failed boot."""
        if self._guest_work is None:
            return
        try:
            await self._guest_work.refresh_clone(vm.vm_id, vm.nics, timeout=CLONE_AGENT_TIMEOUT)
        except MetaldError as exc:
            log.warning(
                "clone %s keeps its snapshot's clock, entropy and identity: %s",
                vm.vm_id, exc.message, extra={"vm_id": vm.vm_id},
            )  # fmt: skip

    # ---- ListSnapshots, DeleteSnapshot ----

    async def list_snapshots(self, customer_id: str, page_size: int, page_token: str) -> SnapshotPage:
        records, _ = self._snapshot_store()
        size = paging.page_size(page_size)
        after = self._tokens.decode(page_token, customer_id, _PAGE_FILTER) if page_token else 0
        rows = await records.list_page(customer_id, after, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        token = self._tokens.encode(customer_id, _PAGE_FILTER, rows[-1].seq) if more else ""
        return SnapshotPage(rows, token, await records.count(customer_id))

    async def delete_snapshot(self, customer_id: str, snapshot_id: str) -> None:
        records, _ = self._snapshot_store()
        await self._owned_snapshot(customer_id, snapshot_id)
        await records.mark_deleted(snapshot_id)
        await self._snapshot_removed(snapshot_id)
        await self.purge_unused_snapshots()

    async def purge_unused_snapshots(self) -> None:
        """Files and records of deleted snapshots that no VM was cloned from any more."""
        if self._snapshots is None or self._opts.snapshots_dir is None:
            return
        for snapshot in await self._snapshots.unused_deleted():
            await asyncio.to_thread(shutil.rmtree, self._opts.snapshots_dir / snapshot.snapshot_id, True)
            await self._snapshots.purge(snapshot.snapshot_id)
            log.info("removed the files of deleted snapshot %s", snapshot.snapshot_id)

    async def recover_snapshots(self) -> None:
        """After a restart: a snapshot cut short is undone (its files and record), as if never
        taken; files no record names (a save cut before its record was written or after it was
        purged) go too."""
        if self._snapshots is None or self._opts.snapshots_dir is None:
            return
        root = self._opts.snapshots_dir
        kept = set()
        for snapshot in await self._snapshots.all_snapshots():
            if snapshot.pending:
                log.info("recovery of snapshot %s: undo_create", snapshot.snapshot_id)
                await self._snapshots.purge(snapshot.snapshot_id)
            else:
                kept.add(snapshot.snapshot_id)
        entries = await asyncio.to_thread(lambda: list(root.iterdir()) if root.is_dir() else [])
        for entry in entries:
            if entry.name not in kept:
                log.info("removing %s: no complete snapshot of that name", entry)
                await asyncio.to_thread(shutil.rmtree, entry, True)
        await self.purge_unused_snapshots()


def restores(state: VmState, snapshot_id: str) -> bool:
    """A clone restores its snapshot at its first boot only; after a shutdown its RAM is gone and
    it cold-boots its own disk."""
    return bool(snapshot_id) and state is VmState.CREATED
