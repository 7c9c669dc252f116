"""The connection to the fleet's PostgreSQL: a small pool that reconnects by itself, the schema
migrated on first use, and every database failure reported as UNAVAILABLE (FLEET_DB_UNAVAILABLE).
Connections are not pinged when taken from the pool (that would be one more round trip on every
call): one broken by a database restart fails its request once and the pool replaces it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from metald.domain.errors import MetaldError, unavailable
from metald.fleet.schema import migrate
from metald.ports import CheckResult

log = logging.getLogger("metald.fleet")

POOL_WAIT_SECONDS = 3.0  # how long a request waits for a connection before answering UNAVAILABLE
CONNECT_TIMEOUT_SECONDS = 3


def db_unavailable(exc: BaseException) -> MetaldError:
    return unavailable(
        "FLEET_DB_UNAVAILABLE", f"the fleet database is unavailable ({type(exc).__name__}); retry shortly"
    )


class FleetDb:
    def __init__(self, dsn: str, *, max_size: int = 4, application_name: str = "metald") -> None:
        self._pool: AsyncConnectionPool[AsyncConnection[tuple[Any, ...]]] = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=max_size,
            open=False,
            timeout=POOL_WAIT_SECONDS,
            kwargs={
                "autocommit": True,
                "application_name": application_name,
                "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            },
        )
        self._migrated = False

    async def open(self) -> None:
        """Starts connecting in the background: a database that is down now is not an error."""
        await self._pool.open(wait=False)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[tuple[Any, ...]]]:
        """A pooled connection (autocommit; use conn.transaction() for more than one statement)."""
        try:
            async with self._pool.connection() as conn:
                if not self._migrated:
                    await migrate(conn)
                    self._migrated = True
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
            raise db_unavailable(exc) from exc

    async def ping(self) -> CheckResult:
        try:
            async with self.connection() as conn:
                await conn.execute("SELECT 1")
        except MetaldError as exc:
            return CheckResult("unhealthy", exc.message)
        return CheckResult("healthy", "fleet database reachable")
