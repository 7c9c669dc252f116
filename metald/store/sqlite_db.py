"""One SQLite connection driven from its own worker thread.

Every call is a function run on that thread, so a transaction (a record change and its event)
is one call that no other statement can interleave with; the event loop never blocks on SQL.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from metald.ports import StoreFullError

T = TypeVar("T")
Row = tuple[Any, ...]

# The database and its -wal / -shm files: only the daemon's user may read them (they hold every
# customer's configuration). SQLite gives -wal and -shm the mode of the database file.
STATE_FILE_MODE = 0o600
SIDE_FILES = ("", "-wal", "-shm", "-journal")


def _is_full(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "full" in text or "readonly" in text or "disk i/o" in text


def secure_state_files(path: Path) -> None:
    """Create the database file 0600 if missing and bring existing state files to 0600.
    A symlink in their place is refused (O_NOFOLLOW), never followed."""
    for suffix in SIDE_FILES:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if suffix == "" else 0)
        try:
            fd = os.open(path.with_name(path.name + suffix), flags, STATE_FILE_MODE)
        except FileNotFoundError:
            continue
        try:
            os.fchmod(fd, STATE_FILE_MODE)
        finally:
            os.close(fd)


class Db:
    def __init__(self, conn: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._conn = conn
        self._executor = executor

    @classmethod
    async def open(cls, path: Path) -> Db:
        path.parent.mkdir(parents=True, exist_ok=True)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metald-sqlite")

        def connect() -> sqlite3.Connection:
            secure_state_files(path)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            return conn

        conn = await asyncio.get_running_loop().run_in_executor(executor, connect)
        return cls(conn, executor)

    async def close(self) -> None:
        await self.run(lambda conn: conn.close())
        self._executor.shutdown(wait=True)

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` on the connection's thread, as it is (no transaction of its own)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, self._conn)

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self.run(lambda conn: conn.execute(sql, params).fetchall())

    async def read_one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        row: Row | None = await self.run(lambda conn: conn.execute(sql, params).fetchone())
        return row

    async def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` in one write transaction: all of it or none. IntegrityError passes through;
        a write the disk refuses (full, read-only) is StoreFullError."""

        def atomically(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        try:
            return await self.run(atomically)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.OperationalError as exc:
            if _is_full(exc):
                raise StoreFullError(str(exc)) from exc
            raise
