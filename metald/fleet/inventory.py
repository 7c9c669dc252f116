"""The queries on the fleet inventory: hosts and their leases, the fleet's view of VMs, create
reservations. Hosts write their own rows; gateways reserve, place and read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql

from metald.api.convert import config_from_proto, config_to_proto
from metald.domain.model import Vm
from metald.domain.states import VmState
from metald.fleet.db import FleetDb
from metald.gen.vmprovisioner.v1 import vm_pb as pb


@dataclass(frozen=True)
class HostCapacity:
    """What a host offers (after overcommit) and what its VMs take (all of them, booted or not)."""

    vcpus_total: int
    memory_total: int
    vms_max: int
    vcpus_used: int = 0
    memory_used: int = 0
    vm_count: int = 0

    def load_with(self, vcpus: int, memory: int) -> float | None:
        """The larger of the vCPU and memory fractions its VMs would take with this one (booted or
        not: any may be booted), or None if it has no room: at its VM cap, or the VM alone is larger
        than the host. Hosts check running vCPUs and memory again at boot, as a lone host does."""
        if (
            (self.vms_max and self.vm_count + 1 > self.vms_max)
            or vcpus > self.vcpus_total
            or memory > self.memory_total
        ):
            return None
        return max(
            (self.vcpus_used + vcpus) / self.vcpus_total, (self.memory_used + memory) / self.memory_total
        )


@dataclass(frozen=True)
class HostRow:
    host_id: str
    url: str
    capacity: HostCapacity
    lease_age_seconds: float
    live: bool
    last_event_seq: int = 0  # the newest event seq the host reported (WatchVms starts there)


@dataclass(frozen=True)
class VmLocation:
    vm_id: str
    customer_id: str
    host_id: str
    url: str
    host_live: bool
    reserved: bool
    state: VmState = VmState.CREATED
    vcpus: int = 0
    memory_bytes: int = 0


def config_bytes(vm: Vm) -> bytes:
    return config_to_proto(vm.config).to_binary()


def vm_from_row(row: Sequence[Any]) -> Vm:
    vm_id, customer_id, state, config, created_at, updated_at, seq = row
    assert isinstance(config, bytes) and isinstance(created_at, datetime) and isinstance(updated_at, datetime)
    return Vm(
        str(vm_id),
        str(customer_id),
        config_from_proto(pb.VmConfig.from_binary(config)),
        VmState(int(state)),
        created_at,
        updated_at,
        seq=int(seq),
    )


# ---- host side ------------------------------------------------------------------------------------


async def heartbeat(
    db: FleetDb, host_id: str, url: str, capacity: HostCapacity, lease_seconds: float, last_event_seq: int = 0
) -> None:
    """Register the host or renew its lease, with its capacity and usage now."""
    c = capacity
    async with db.connection() as conn:
        await conn.execute(
            """INSERT INTO fleet_hosts (host_id, url, vcpus_total, memory_total, vms_max,
                   vcpus_used, memory_used, vm_count, last_event_seq, lease_until)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, now() + make_interval(secs => %s))
               ON CONFLICT (host_id) DO UPDATE SET url = EXCLUDED.url,
                   vcpus_total = EXCLUDED.vcpus_total, memory_total = EXCLUDED.memory_total,
                   vms_max = EXCLUDED.vms_max, vcpus_used = EXCLUDED.vcpus_used,
                   memory_used = EXCLUDED.memory_used, vm_count = EXCLUDED.vm_count,
                   last_event_seq = EXCLUDED.last_event_seq, heartbeat_at = now(), lease_until = EXCLUDED.lease_until""",
            (
                host_id,
                url,
                c.vcpus_total,
                c.memory_total,
                c.vms_max,
                c.vcpus_used,
                c.memory_used,
                c.vm_count,
                last_event_seq,
                lease_seconds,
            ),
        )


async def upsert_vms(db: FleetDb, host_id: str, vms: Sequence[Vm]) -> None:
    """The host's records win: whatever the view said about these VMs is replaced."""
    if not vms:
        return
    rows = [
        (
            vm.vm_id,
            vm.customer_id,
            host_id,
            int(vm.state),
            vm.config.vcpu_count,
            vm.config.memory_bytes,
            config_bytes(vm),
            vm.created_at,
            vm.snapshot_id,
        )
        for vm in vms
    ]
    async with db.connection() as conn, conn.cursor() as cursor:
        await cursor.executemany(
            """INSERT INTO fleet_vms (vm_id, customer_id, host_id, state, vcpus, memory_bytes, config, created_at,
                   snapshot_id)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (vm_id) DO UPDATE SET customer_id = EXCLUDED.customer_id,
                   host_id = EXCLUDED.host_id, state = EXCLUDED.state, reserved = false,
                   vcpus = EXCLUDED.vcpus, memory_bytes = EXCLUDED.memory_bytes,
                   config = EXCLUDED.config, created_at = EXCLUDED.created_at,
                   snapshot_id = EXCLUDED.snapshot_id, updated_at = now()""",
            rows,
        )


async def remove_rows(db: FleetDb, table: str, key: str, host_id: str, ids: Sequence[str]) -> None:
    """Drop this host's rows (of `table`, keyed by `key`) of records it no longer holds."""
    if ids:
        query = sql.SQL("DELETE FROM {} WHERE host_id = %s AND {} = ANY(%s)")
        async with db.connection() as conn:
            await conn.execute(query.format(sql.Identifier(table), sql.Identifier(key)), (host_id, list(ids)))


async def sweep_rows(
    db: FleetDb, table: str, key: str, host_id: str, live_ids: Sequence[str], grace_seconds: float
) -> None:
    """Drop rows of this host that it does not hold and that nobody touched for `grace_seconds`:
    reservations whose create never reached it, records deleted while the database was away."""
    query = sql.SQL(
        """DELETE FROM {} WHERE host_id = %s AND NOT ({} = ANY(%s))
           AND updated_at < now() - make_interval(secs => %s)"""
    )
    async with db.connection() as conn:
        await conn.execute(
            query.format(sql.Identifier(table), sql.Identifier(key)), (host_id, list(live_ids), grace_seconds)
        )


# ---- gateway side ---------------------------------------------------------------------------------


async def locate(db: FleetDb, vm_id: str) -> VmLocation | None:
    async with db.connection() as conn:
        cursor = await conn.execute(
            """SELECT v.customer_id, v.host_id, h.url, h.lease_until > now(), v.reserved, v.state,
                   v.vcpus, v.memory_bytes
               FROM fleet_vms v JOIN fleet_hosts h USING (host_id) WHERE v.vm_id = %s""",
            (vm_id,),
        )
        row = await cursor.fetchone()
    if row is None:
        return None
    customer_id, host_id, url, live, reserved, state, vcpus, memory = row
    return VmLocation(
        vm_id,
        str(customer_id),
        str(host_id),
        str(url),
        bool(live),
        bool(reserved),
        VmState(int(state)),
        int(vcpus),
        int(memory),
    )


@dataclass(frozen=True)
class HostLeaseRow:
    host_id: str
    url: str
    lease_left_seconds: float  # by the database's clock; negative once lapsed


async def leases(db: FleetDb) -> list[HostLeaseRow]:
    """Every host's url and the time left on its lease (the gateway's host view)."""
    async with db.connection() as conn:
        cursor = await conn.execute(
            "SELECT host_id, url, extract(epoch FROM lease_until - now()) FROM fleet_hosts"
        )
        rows = await cursor.fetchall()
    return [HostLeaseRow(str(r[0]), str(r[1]), float(r[2])) for r in rows]


async def hosts(db: FleetDb) -> list[HostRow]:
    async with db.connection() as conn:
        cursor = await conn.execute(
            """SELECT host_id, url, vcpus_total, memory_total, vms_max, vcpus_used, memory_used,
                   vm_count, extract(epoch FROM now() - heartbeat_at), lease_until > now(),
                   last_event_seq
               FROM fleet_hosts ORDER BY host_id"""
        )
        rows = await cursor.fetchall()
    return [
        HostRow(
            str(r[0]),
            str(r[1]),
            HostCapacity(*(int(v) for v in r[2:8])),
            float(r[8]),
            bool(r[9]),
            int(r[10]),
        )
        for r in rows
    ]


async def set_state(db: FleetDb, vm_id: str, host_id: str, state: VmState) -> None:
    async with db.connection() as conn:
        await conn.execute(
            "UPDATE fleet_vms SET state = %s, reserved = false, updated_at = now() "
            "WHERE vm_id = %s AND host_id = %s",
            (int(state), vm_id, host_id),
        )


async def forget(db: FleetDb, vm_id: str, host_id: str) -> None:
    async with db.connection() as conn:
        await conn.execute("DELETE FROM fleet_vms WHERE vm_id = %s AND host_id = %s", (vm_id, host_id))


async def forget_reservation(db: FleetDb, vm_id: str, host_id: str) -> None:
    """Drop a reservation whose create the host refused (a confirmed VM is never touched)."""
    async with db.connection() as conn:
        await conn.execute(
            "DELETE FROM fleet_vms WHERE vm_id = %s AND host_id = %s AND reserved", (vm_id, host_id)
        )


def _state_clause(states: Sequence[VmState]) -> tuple[str, list[object]]:
    if not states:
        return "", []
    return " AND state = ANY(%s)", [[int(s) for s in states]]


async def list_page(
    db: FleetDb, customer_id: str, states: Sequence[VmState], after_seq: int, limit: int
) -> tuple[list[Vm], int]:
    """One keyset page of the customer's VMs over every host (creates in flight left out), and the
    fleet-wide count for the same filter."""
    clause, params = _state_clause(states)
    async with db.connection() as conn:
        async with conn.pipeline():  # both queries in one round trip
            page = await conn.execute(
                "SELECT vm_id, customer_id, state, config, created_at, updated_at, seq FROM fleet_vms "
                f"WHERE customer_id = %s AND NOT reserved AND seq > %s{clause} ORDER BY seq LIMIT %s",
                [customer_id, after_seq, *params, limit],
            )
            count = await conn.execute(
                f"SELECT count(*) FROM fleet_vms WHERE customer_id = %s AND NOT reserved{clause}",
                [customer_id, *params],
            )
        rows = await page.fetchall()
        total = await count.fetchone()
    return [vm_from_row(r) for r in rows], int(total[0]) if total else 0


async def customer_usage(db: FleetDb, customer_id: str, states: Sequence[VmState]) -> tuple[int, int, int]:
    """(VMs, vCPUs, memory bytes) of one customer fleet-wide, over `states` (all if empty)."""
    clause, params = _state_clause(states)
    async with db.connection() as conn:
        cursor = await conn.execute(
            "SELECT count(*), coalesce(sum(vcpus), 0), coalesce(sum(memory_bytes), 0) FROM fleet_vms "
            f"WHERE customer_id = %s{clause}",
            [customer_id, *params],
        )
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


async def state_counts(db: FleetDb) -> dict[tuple[str, VmState], int]:
    async with db.connection() as conn:
        cursor = await conn.execute(
            "SELECT customer_id, state, count(*) FROM fleet_vms WHERE NOT reserved GROUP BY 1, 2"
        )
        rows = await cursor.fetchall()
    return {(str(c), VmState(int(s))): int(n) for c, s, n in rows}


async def host_counts(db: FleetDb, active: Sequence[VmState]) -> dict[str, tuple[int, int, int]]:
    """host id -> (VMs the fleet view holds, of them in `active` states, snapshots)."""
    async with db.connection() as conn:
        cursor = await conn.execute(
            """SELECT h.host_id,
                   (SELECT count(*) FROM fleet_vms v WHERE v.host_id = h.host_id AND NOT v.reserved),
                   (SELECT count(*) FROM fleet_vms v WHERE v.host_id = h.host_id AND NOT v.reserved
                       AND v.state = ANY(%s)),
                   (SELECT count(*) FROM fleet_snapshots s WHERE s.host_id = h.host_id)
               FROM fleet_hosts h""",
            ([int(s) for s in active],),
        )
        rows = await cursor.fetchall()
    return {str(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in rows}
