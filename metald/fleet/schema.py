"""The fleet inventory's schema as versioned migrations, applied in order under an advisory lock,
each in its own transaction, recorded in fleet_schema_version. Never edit a released step: add one."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

MIGRATION_LOCK = 0x6D6574616C64  # "metald": one migrator at a time, whichever process starts first

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: hosts with their lease and capacity, the fleet's view of VMs (a create reservation is a
    # row with reserved = true: the primary key makes one VM per vm_id across all gateways).
    (
        """CREATE TABLE fleet_hosts (
            host_id       text PRIMARY KEY,
            url           text NOT NULL,
            vcpus_total   bigint NOT NULL,
            memory_total  bigint NOT NULL,
            vms_max       bigint NOT NULL,
            vcpus_used    bigint NOT NULL DEFAULT 0,
            memory_used   bigint NOT NULL DEFAULT 0,
            vm_count      bigint NOT NULL DEFAULT 0,
            registered_at timestamptz NOT NULL DEFAULT now(),
            heartbeat_at  timestamptz NOT NULL DEFAULT now(),
            lease_until   timestamptz NOT NULL
        )""",
        """CREATE TABLE fleet_vms (
            vm_id        text PRIMARY KEY,
            seq          bigint GENERATED ALWAYS AS IDENTITY,
            customer_id  text NOT NULL,
            host_id      text NOT NULL REFERENCES fleet_hosts (host_id),
            state        smallint NOT NULL,
            reserved     boolean NOT NULL DEFAULT false,
            vcpus        integer NOT NULL,
            memory_bytes bigint NOT NULL,
            config       bytea NOT NULL,
            created_at   timestamptz NOT NULL DEFAULT now(),
            updated_at   timestamptz NOT NULL DEFAULT now()
        )""",
        "CREATE INDEX fleet_vms_customer_seq ON fleet_vms (customer_id, seq)",
        "CREATE INDEX fleet_vms_host ON fleet_vms (host_id) INCLUDE (vcpus, memory_bytes, state)",
    ),
    # 2: snapshots live on the host of their source VM: the fleet's map of snapshot -> host (hosts
    # write their rows as they write their VMs'), the snapshot a clone was made from, and each
    # host's newest event seq (where a gateway watch that has seen nothing of it starts).
    (
        """CREATE TABLE fleet_snapshots (
            snapshot_id    text PRIMARY KEY,
            seq            bigint GENERATED ALWAYS AS IDENTITY,
            customer_id    text NOT NULL,
            host_id        text NOT NULL REFERENCES fleet_hosts (host_id),
            source_vm_id   text NOT NULL,
            size_bytes     bigint NOT NULL,
            warm_pool_size integer NOT NULL DEFAULT 0,
            metadata       jsonb NOT NULL DEFAULT '{}',
            config         bytea NOT NULL,
            created_at     timestamptz NOT NULL,
            updated_at     timestamptz NOT NULL DEFAULT now()
        )""",
        "CREATE INDEX fleet_snapshots_customer_seq ON fleet_snapshots (customer_id, seq)",
        "CREATE INDEX fleet_snapshots_host ON fleet_snapshots (host_id)",
        "ALTER TABLE fleet_vms ADD COLUMN snapshot_id text NOT NULL DEFAULT ''",
        "ALTER TABLE fleet_hosts ADD COLUMN last_event_seq bigint NOT NULL DEFAULT 0",
    ),
)


async def migrate(conn: AsyncConnection[Any]) -> int:
    """Bring the schema up to date; returns the version now in force."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS fleet_schema_version "
            "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cursor = await conn.execute("SELECT coalesce(max(version), 0) FROM fleet_schema_version")
        row = await cursor.fetchone()
        current = int(row[0]) if row else 0
        for version, statements in enumerate(MIGRATIONS[current:], start=current + 1):
            async with conn.transaction():
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO fleet_schema_version (version) VALUES (%s)", (version,))
        return len(MIGRATIONS) if current < len(MIGRATIONS) else current
