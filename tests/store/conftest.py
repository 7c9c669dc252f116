"""Every store the project ships, for the contract suites."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from metald.ports import EventRetention, Store
from metald.store.memory import MemoryStore
from metald.store.sqlite import SqliteStore

OpenStore = Callable[[EventRetention], Awaitable[Store]]


@pytest.fixture(params=["sqlite", "memory"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> OpenStore:
    async def sqlite(retention: EventRetention) -> Store:
        return await SqliteStore.open(tmp_path / "metald.db", retention)

    async def memory(retention: EventRetention) -> Store:
        return MemoryStore(retention)

    return sqlite if request.param == "sqlite" else memory


@pytest.fixture
async def store(open_store: OpenStore) -> AsyncIterator[Store]:
    s = await open_store(EventRetention())
    yield s
    await s.close()
