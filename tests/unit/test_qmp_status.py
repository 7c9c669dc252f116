"""QmpClient.status against a scripted QMP server on a UNIX socket: QEMU's run state is asked
only while no answer and no event since says it runs, and never taken from an answer that an
event followed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from metald.backends.qemu.qmp import QmpClient, QmpClosedError


class FakeQemu:
    """Answers query-status with `state`; `event` writes an event; `then` is written right after
    the next answer, in the same write (an event QEMU sent before we read the answer)."""

    def __init__(self) -> None:
        self.state = "running"
        self.queries = 0
        self.then: dict[str, Any] | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        writer.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        while line := await reader.readline():
            msg = json.loads(line)
            answer: Any = {}
            if msg["execute"] == "query-status":
                self.queries += 1
                answer = {"status": self.state, "running": self.state == "running"}
            data = json.dumps({"return": answer, "id": msg["id"]}) + "\n"
            if self.then is not None:
                data += json.dumps(self.then) + "\n"
                self.then = None
            writer.write(data.encode())
        writer.close()

    async def event(self, name: str) -> None:
        for writer in self._writers:
            writer.write(json.dumps({"event": name, "data": {}, "timestamp": {}}).encode() + b"\n")
            await writer.drain()

    def hang_up(self) -> None:
        for writer in self._writers:
            writer.close()


@pytest.fixture
async def qemu(tmp_path: Path) -> AsyncIterator[tuple[FakeQemu, QmpClient]]:
    fake = FakeQemu()
    server = await asyncio.start_unix_server(fake.serve, path=str(tmp_path / "qmp.sock"))
    client = await QmpClient.connect(tmp_path, "qmp.sock", timeout=5)
    try:
        yield fake, client
    finally:
        await client.close()
        server.close()


async def _settle() -> None:
    """Long enough for the client's reader to take in what the server wrote."""
    await asyncio.sleep(0.05)


async def test_a_running_vm_is_asked_once_until_an_event(qemu: tuple[FakeQemu, QmpClient]) -> None:
    fake, client = qemu
    assert [await client.status() for _ in range(3)] == ["running"] * 3
    assert fake.queries == 1
    fake.state = "paused"
    await fake.event("STOP")
    await _settle()
    assert await client.status() == "paused"
    assert await client.status() == "paused"
    assert fake.queries == 3  # not running: asked every time
    fake.state = "running"
    await fake.event("RESUME")
    await _settle()
    assert await client.status() == "running"
    assert fake.queries == 3  # RESUME says so


async def test_any_event_makes_it_ask_again(qemu: tuple[FakeQemu, QmpClient]) -> None:
    fake, client = qemu
    await client.status()
    fake.state = "suspended"
    await fake.event("SUSPEND")  # no STOP on the way to "suspended"
    await _settle()
    assert await client.status() == "suspended"
    assert fake.queries == 2


async def test_an_answer_followed_by_an_event_is_not_kept(qemu: tuple[FakeQemu, QmpClient]) -> None:
    fake, client = qemu
    fake.then = {"event": "STOP", "data": {}, "timestamp": {}}
    assert await client.status() == "running"  # what QEMU answered
    await _settle()
    fake.state = "paused"
    assert await client.status() == "paused"  # the STOP after it was not overtaken
    assert fake.queries == 2


async def test_a_closed_connection_is_not_running(qemu: tuple[FakeQemu, QmpClient]) -> None:
    fake, client = qemu
    assert await client.status() == "running"
    fake.hang_up()
    await _settle()
    with pytest.raises(QmpClosedError):
        await client.status()
