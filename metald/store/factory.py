"""The store the settings name; the daemon's only way to get one."""

from __future__ import annotations

from metald.ports import EventRetention, Store
from metald.settings import Settings
from metald.store.memory import MemoryStore
from metald.store.sqlite import SqliteStore


def event_retention(settings: Settings) -> EventRetention:
    return EventRetention(settings.event_retention_count, settings.event_retention_seconds)


async def open_store(settings: Settings) -> Store:
    if settings.store == "memory":
        return MemoryStore(event_retention(settings))
    return await SqliteStore.open(settings.db_path, event_retention(settings))
