"""Warm pools: for a snapshot with `warm_pool_size` N, N VMMs started ahead of time that wait for
a clone's device state (WarmPoolBackend), so a clone's BootVm skips the VMM's start.

- Bounds: N is at most `max_warm_pool_size` (checked at SnapshotVm), and a slot is only started
  while the host's memory limit (`max_host_memory_bytes`) has room for it next to the VMs running
  or booting and the other slots; a pool short of room says so in its status and fills later.
- Fill: one background task per pool starts slots one at a time until N wait; a failure is retried
  with a growing delay, and after `MAX_FAILURES` in a row the pool stops trying until its next use
  (a clone's boot that takes a slot, or finds none).
- NICs: a slot of a snapshot whose VM had N interfaces starts with N TAPs that the network holds
  for it (Network.hold: a namespace of the slot's own, links down, no address, no bridge). For a
  clone that takes the slot, that namespace becomes the clone's, its TAPs renamed to the clone's
  (take_held), before its network is attached as any VM's; the holder's name then goes (unhold).
- Take: the first BootVm of a clone takes a waiting slot if the clone can run in it (as many NICs
  as the snapshot's VM, the default console file: both are fixed in the slot's command line); the
  pool refills a second later (REFILL_DELAY_SECONDS), once that clone's restore no longer needs
  the CPU. Without a slot the clone restores the normal way (a miss).
- Stop: deleting the snapshot stops its slots, as does a daemon's shutdown. A daemon restart (or
  one killed with -9) removes every slot an earlier daemon left (process, cgroup, directory,
  holder namespace), then refills every pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from metald.domain.model import Vm
from metald.domain.snapshots import Snapshot
from metald.domain.states import ACTIVE_STATES, VmState
from metald.ports import CheckResult, LaunchSpec, VmRuntime, WarmPoolBackend, WarmPoolStatus
from metald.service.launch import Launch
from metald.service.snapshots import restores

log = logging.getLogger("metald.service")

MAX_FAILURES = 3
RETRY_SECONDS = 2.0
# A refill after a take waits this long: starting a slot (qemu-img, the supervisor's Python, QEMU)
# would otherwise take the CPU from the clone that just took one, whose guest must answer its agent.
REFILL_DELAY_SECONDS = 1.0
SLOT_PREFIX = "pool_"


@dataclass(eq=False)
class _Pool:
    snapshot: Snapshot
    ready: list[Path] = field(default_factory=list)
    starting: int = 0
    failures: int = 0
    blocked: str = ""  # why the pool is not full ("" if it is, or is filling)
    stopped: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def target(self) -> int:
        return self.snapshot.warm_pool_size


class Pools(Launch):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pools: dict[str, _Pool] = {}
        self._pool_hits = self._pool_misses = 0

    def _pool_port(self) -> WarmPoolBackend | None:
        if not self._backend.capabilities.supports_warm_pool or self._opts.pool_dir is None:
            return None
        return cast(WarmPoolBackend, self._backend)

    # ---- hooks of the snapshot use cases (snapshots.py) ----

    async def _snapshot_added(self, snapshot: Snapshot) -> None:
        if snapshot.warm_pool_size > 0 and self._pool_port() is not None:
            self._pools[snapshot.snapshot_id] = pool = _Pool(snapshot)
            self._kick(pool)

    async def _snapshot_removed(self, snapshot_id: str) -> None:
        pool = self._pools.pop(snapshot_id, None)
        if pool is not None and self._pool_port() is not None:
            await self._stop_pool(pool)

    async def close_pools(self) -> None:
        """At daemon shutdown: no slot is left waiting (the next daemon fills its own)."""
        while self._pools:
            await self._stop_pool(self._pools.popitem()[1])

    async def _stop_pool(self, pool: _Pool) -> None:
        pool.stopped = True
        if pool.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(pool.task)  # a slot being started is stopped by the task itself
        for slot_dir in pool.ready:
            await self._stop_slot(slot_dir)
        pool.ready.clear()
        assert self._opts.pool_dir is not None
        await asyncio.to_thread(shutil.rmtree, self._opts.pool_dir / pool.snapshot.snapshot_id, True)

    async def _stop_slot(self, slot_dir: Path) -> None:
        port = self._pool_port()
        assert port is not None
        await port.stop_pool_slot(slot_dir)
        await self._unhold(slot_dir)

    async def _unhold(self, slot_dir: Path) -> None:
        """The slot's holder namespace (its TAPs, or what is left of them once a clone took them)."""
        if self._network is not None:
            await self._network.unhold(slot_dir.name)

    async def recover_snapshots(self) -> None:
        await super().recover_snapshots()
        await self._recover_pools()

    async def _recover_pools(self) -> None:
        """Slots an earlier daemon left are stopped (a kill -9 leaves them waiting), then every
        pool is filled again."""
        root = self._opts.pool_dir
        if root is None or not await asyncio.to_thread(root.is_dir):
            return
        port = self._pool_port()
        for snapshot_dir in await asyncio.to_thread(lambda: sorted(root.iterdir())):
            for slot_dir in await asyncio.to_thread(lambda d=snapshot_dir: sorted(d.iterdir())):  # type: ignore[misc]
                if port is not None:
                    await port.stop_pool_slot(slot_dir)
                log.info("recovery: removed warm pool slot %s left by an earlier daemon", slot_dir.name)
            await asyncio.to_thread(shutil.rmtree, snapshot_dir, True)
        if self._network is not None:  # also those of slots killed before their directory existed
            await self._network.unhold(None)
        if self._snapshots is not None:
            for snapshot in await self._snapshots.all_snapshots():
                if not snapshot.pending and not snapshot.deleted:
                    await self._snapshot_added(snapshot)

    # ---- filling ----

    def _kick(self, pool: _Pool, delay: float = 0.0) -> None:
        if not pool.stopped and (pool.task is None or pool.task.done()):
            pool.task = asyncio.create_task(self._fill(pool, delay))

    async def _fill(self, pool: _Pool, delay: float = 0.0) -> None:
        await asyncio.sleep(delay)
        port = self._pool_port()
        assert port is not None and self._opts.pool_dir is not None
        if pool.snapshot.config.network and self._network is None:
            pool.blocked = "its VM has network interfaces and networking is disabled"
            return
        while not pool.stopped and pool.failures < MAX_FAILURES:
            for gone in [d for d in pool.ready if not port.pool_slot_running(d)]:
                pool.ready.remove(gone)
                await self._unhold(gone)
            if len(pool.ready) >= pool.target:
                pool.blocked = ""
                return
            if not await self._room_for_slot(pool):
                pool.blocked = "host memory limit reached"
                return
            slot_dir = self._opts.pool_dir / pool.snapshot.snapshot_id / (SLOT_PREFIX + secrets.token_hex(6))
            pool.starting += 1
            try:
                await port.start_pool_slot(await self._slot_spec(pool.snapshot, slot_dir))
            except Exception as exc:
                pool.failures += 1
                pool.blocked = f"slot failed to start: {exc}"
                log.warning("warm pool of %s: %s", pool.snapshot.snapshot_id, pool.blocked)
                await self._stop_slot(slot_dir)
                if pool.failures < MAX_FAILURES:
                    await asyncio.sleep(RETRY_SECONDS * pool.failures)
                continue
            finally:
                pool.starting -= 1
            if pool.stopped:  # the snapshot was deleted meanwhile
                await self._stop_slot(slot_dir)
                return
            pool.ready.append(slot_dir)
            pool.failures = 0

    async def _room_for_slot(self, pool: _Pool) -> bool:
        limit = self._opts.quotas.max_host_memory_bytes
        if not limit:
            return True
        _, _, running = await self._vms.usage(None, sorted(ACTIVE_STATES))
        booting = sum(vm.config.memory_bytes for vm in self._booting.values())
        slots = sum(
            (len(p.ready) + p.starting) * p.snapshot.config.memory_bytes for p in self._pools.values()
        )
        return running + booting + slots + pool.snapshot.config.memory_bytes <= limit

    async def _slot_spec(self, snapshot: Snapshot, slot_dir: Path) -> LaunchSpec:
        """A clone's launch in `slot_dir`, named after the slot, with held TAPs for its NICs."""
        now = datetime.now(UTC)
        name = slot_dir.name
        template = Vm(name, snapshot.customer_id, snapshot.config, VmState.CREATED, now, now, snapshot_id=snapshot.snapshot_id)  # fmt: skip
        held = None
        if snapshot.config.network and self._network is not None:
            held = await self._network.hold(name, len(snapshot.config.network))
        spec = await self._launch_spec(template, held)
        await asyncio.to_thread(slot_dir.parent.mkdir, mode=0o700, parents=True, exist_ok=True)
        return dataclasses.replace(spec, vm_dir=slot_dir, console_path=slot_dir / "console.log")

    # ---- taking a slot (BootVm) ----

    @contextlib.asynccontextmanager
    async def _pool_slot(self, vm: Vm) -> AsyncIterator[Path | None]:
        """A clone's first boot, inside: a waiting slot of its snapshot's pool if one fits, its held
        TAPs already the clone's (attach then plumbs them); whatever happens, the slot's holder
        namespace goes afterwards."""
        slot = await self._take_slot(vm)
        try:
            yield slot
        finally:
            port = self._pool_port()
            if slot is not None and port is not None and port.pool_slot_running(slot):
                await asyncio.shield(self._stop_slot(slot))  # the boot failed before taking it
            elif slot is not None:
                await asyncio.shield(self._unhold(slot))

    async def _take_slot(self, vm: Vm) -> Path | None:
        pool = self._pools.get(vm.snapshot_id) if restores(vm.state, vm.snapshot_id) else None
        if pool is None:
            return None
        fits = (
            len(vm.config.network) == len(pool.snapshot.config.network)
            and self._console_path(vm) == self._vm_dir(vm.vm_id) / "console.log"
        )
        if not fits or not pool.ready:
            self._pool_misses += 1
            if not pool.ready:  # a pool that gave up (failures, no room) tries again
                pool.failures = 0
                self._kick(pool, REFILL_DELAY_SECONDS)
            return None
        slot = pool.ready.pop(0)
        pool.failures = 0
        self._kick(pool, REFILL_DELAY_SECONDS)
        if (
            vm.config.network
            and self._network is not None
            and not await self._network.take_held(vm, slot.name)
        ):
            log.warning("warm pool slot %s: its TAPs cannot be moved to %s", slot.name, vm.vm_id)
            self._pool_misses += 1
            await self._stop_slot(slot)
            return None
        return slot

    def _count_pool_use(self, spec: LaunchSpec, runtime: VmRuntime) -> None:
        """After the start: a slot the backend found gone was a miss after all."""
        if spec.pool_slot is None:
            return
        if runtime.extra.get("warm_pool_slot") == spec.pool_slot.name:
            self._pool_hits += 1
        else:
            self._pool_misses += 1

    # ---- what /health and /metrics show ----

    def warm_pool_status(self) -> WarmPoolStatus:
        pools = list(self._pools.values())
        return WarmPoolStatus(
            pools=len(pools),
            target=sum(p.target for p in pools),
            ready=sum(len(p.ready) for p in pools),
            starting=sum(p.starting for p in pools),
            hits=self._pool_hits,
            misses=self._pool_misses,
            blocked=tuple(f"{p.snapshot.snapshot_id}: {p.blocked}" for p in pools if p.blocked),
        )

    async def warm_pool_check(self) -> CheckResult:
        """/health: degraded while a pool cannot fill for a reason other than a full host."""
        s = self.warm_pool_status()
        detail = f"{s.pools} pools, {s.ready}/{s.target} slots ready, {s.hits} hits, {s.misses} misses"
        if s.blocked:
            detail += "; " + "; ".join(s.blocked)
        failing = any(p.failures >= MAX_FAILURES for p in self._pools.values())
        return CheckResult("degraded" if failing else "healthy", detail)
