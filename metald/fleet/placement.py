"""Where a new VM goes: a create reservation (one row per vm_id, whichever gateway asks) on the
least loaded of a few live candidate hosts that has room, with the customer's fleet-wide VM quota
checked under a per-customer lock so that concurrent creates through any gateways cannot overshoot."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from metald.domain.errors import MetaldError, exhausted, unavailable, vm_exists
from metald.domain.model import Vm
from metald.domain.quotas import Quotas, check_create
from metald.fleet.db import FleetDb
from metald.fleet.inventory import HostCapacity, config_bytes

CANDIDATES = 3  # hosts compared exactly per placement, picked by the load they last reported


@dataclass(frozen=True)
class Placement:
    host_id: str
    url: str
    retried: bool  # the vm_id was reserved before (a retried create): finish it on that host


@dataclass(frozen=True)
class Candidate:
    host_id: str
    url: str
    capacity: HostCapacity


def choose(candidates: Sequence[Candidate], vcpus: int, memory: int) -> Candidate | None:
    """The least loaded candidate with room (ties: fewer VMs, then at random)."""
    scored = [
        (load, c.capacity.vm_count, random.random(), c)
        for c in candidates
        if (load := c.capacity.load_with(vcpus, memory)) is not None
    ]
    return min(scored, key=lambda s: s[:3])[3] if scored else None


def host_unavailable(host_id: str, vm_id: str = "") -> MetaldError:
    metadata = {"host_id": host_id, **({"vm_id": vm_id} if vm_id else {})}
    return unavailable(
        "HOST_UNAVAILABLE",
        f"host {host_id} is down (its lease expired); its VMs answer again once it is back",
        **metadata,
    )


_LIVE_HOSTS = """SELECT host_id, url, vcpus_total, memory_total, vms_max FROM fleet_hosts
    WHERE lease_until > now() AND vcpus_total > 0 AND memory_total > 0 AND (%(host)s = '' OR host_id = %(host)s)
    ORDER BY greatest(vcpus_used::float8 / vcpus_total, memory_used::float8 / memory_total)"""


async def _candidates(
    conn: psycopg.AsyncConnection[tuple[Any, ...]], limit: int | None, host_id: str = ""
) -> list[Candidate]:
    cursor = await conn.execute(_LIVE_HOSTS + (f" LIMIT {int(limit)}" if limit else ""), {"host": host_id})
    hosts = {str(r[0]): r for r in await cursor.fetchall()}
    cursor = await conn.execute(
        "SELECT host_id, count(*), sum(vcpus), sum(memory_bytes) FROM fleet_vms "
        "WHERE host_id = ANY(%s) GROUP BY host_id",
        (list(hosts),),
    )
    usage = {str(r[0]): r[1:] for r in await cursor.fetchall()}
    out = []
    for host_id, (_, url, vcpus, memory, vms_max) in hosts.items():
        count, used_vcpus, used_memory = usage.get(host_id, (0, 0, 0))
        used = (int(used_vcpus), int(used_memory), int(count))
        out.append(Candidate(host_id, str(url), HostCapacity(int(vcpus), int(memory), int(vms_max), *used)))
    return out


async def reserve(db: FleetDb, vm: Vm, quotas: Quotas, on_host: str = "") -> Placement:
    """Reserve `vm.vm_id` on a host (vm.config has the defaults applied: it sizes the VM); with
    `on_host`, on that host only (a clone goes where its snapshot is)."""
    vcpus, memory = vm.config.vcpu_count, vm.config.memory_bytes
    try:
        async with db.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (vm.customer_id,))
            cursor = await conn.execute(
                """SELECT v.customer_id, v.reserved, v.host_id, h.url, h.lease_until > now()
                   FROM fleet_vms v JOIN fleet_hosts h USING (host_id) WHERE v.vm_id = %s""",
                (vm.vm_id,),
            )
            existing = await cursor.fetchone()
            if existing is not None:
                customer, reserved, host_id, url, live = existing
                if not (reserved and customer == vm.customer_id):
                    raise vm_exists(vm.vm_id)
                if not live:
                    raise host_unavailable(str(host_id), vm.vm_id)
                return Placement(str(host_id), str(url), retried=True)
            cursor = await conn.execute(
                "SELECT count(*) FROM fleet_vms WHERE customer_id = %s", (vm.customer_id,)
            )
            row = await cursor.fetchone()
            check_create(quotas, int(row[0]) if row else 0, 0)
            if on_host:
                chosen = choose(await _candidates(conn, None, on_host), vcpus, memory)
                if chosen is None:
                    raise await _no_room_on(conn, on_host, vcpus, memory)
            else:
                chosen = choose(await _candidates(conn, CANDIDATES), vcpus, memory) or choose(
                    await _candidates(conn, None), vcpus, memory
                )
                if chosen is None:
                    raise await _no_room(conn, vcpus, memory)
            await conn.execute(
                """INSERT INTO fleet_vms (vm_id, customer_id, host_id, state, reserved, vcpus,
                       memory_bytes, config) VALUES (%s, %s, %s, %s, true, %s, %s, %s)""",
                (vm.vm_id, vm.customer_id, chosen.host_id, int(vm.state), vcpus, memory, config_bytes(vm)),
            )
            return Placement(chosen.host_id, chosen.url, retried=False)
    except psycopg.errors.UniqueViolation:  # another customer's create of the same id won the race
        raise vm_exists(vm.vm_id) from None


async def _no_room(conn: psycopg.AsyncConnection[tuple[Any, ...]], vcpus: int, memory: int) -> MetaldError:
    cursor = await conn.execute("SELECT count(*) FROM fleet_hosts WHERE lease_until > now()")
    row = await cursor.fetchone()
    live = int(row[0]) if row else 0
    if live == 0:
        return unavailable("NO_LIVE_HOST", "no live host in the fleet")
    return exhausted(
        "FLEET_CAPACITY_EXHAUSTED",
        f"no host in the fleet has room for {vcpus} vCPUs and {memory} bytes of memory ({live} live hosts full)",
        live_hosts=str(live),
        vcpus=str(vcpus),
        memory_bytes=str(memory),
    )


async def _no_room_on(
    conn: psycopg.AsyncConnection[tuple[Any, ...]], host_id: str, vcpus: int, memory: int
) -> MetaldError:
    """Why a clone cannot go on its snapshot's host: the host is down, or it has no room."""
    cursor = await conn.execute("SELECT lease_until > now() FROM fleet_hosts WHERE host_id = %s", (host_id,))
    row = await cursor.fetchone()
    if row is None or not row[0]:
        return host_unavailable(host_id)
    return exhausted(
        "SNAPSHOT_HOST_FULL",
        f"host {host_id}, which holds the snapshot, has no room for a clone of {vcpus} vCPUs and "
        f"{memory} bytes of memory (clones run where their snapshot is)",
        host_id=host_id,
        vcpus=str(vcpus),
        memory_bytes=str(memory),
    )
