"""The host side of the agent channel against fake guests on UNIX sockets, hostile ones included:
garbage, huge length prefixes, floods and silence reset that VM's channel only."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from metald.agent.channel import ChannelLimits
from metald.agent.pool import GuestAgentPool
from metald.agent.protocol import HEADER, Frame, MsgType, Tag, encode, parse_fields, parse_header
from metald.domain.errors import ErrorCode, MetaldError
from metald.usecases import ExecCommand

Handler = Callable[[Frame, asyncio.StreamWriter], Awaitable[None]]


class FakeGuest:
    """A guest end of the agent socket: reads frames, lets `handler` answer each."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.connections = 0
        self.disconnects = 0
        self.received: list[Frame] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> FakeGuest:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                msg_type, request_id, length = parse_header(await reader.readexactly(HEADER.size))
                frame = Frame(msg_type, request_id, parse_fields(await reader.readexactly(length)))
                self.received.append(frame)
                await self.handler(frame, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.disconnects += 1
        finally:
            writer.close()


async def polite(frame: Frame, writer: asyncio.StreamWriter) -> None:
    """Answers like the real agent: PONG, exec output then EXIT, FILE / ERROR."""
    rid = frame.request_id
    if frame.type == MsgType.PING:
        writer.write(encode(MsgType.PONG, rid, [(Tag.VERSION, "1")]))
    elif frame.type == MsgType.EXEC:
        args = [v.decode() for t, v in frame.fields if t == Tag.ARG]
        if args[0] == "sleep":
            await asyncio.sleep(float(args[1]))
        writer.write(encode(MsgType.OUTPUT, rid, [(Tag.STREAM, 1), (Tag.DATA, " ".join(args).encode())]))
        writer.write(encode(MsgType.OUTPUT, rid, [(Tag.STREAM, 2), (Tag.DATA, frame.raw(Tag.STDIN) or b"")]))
        writer.write(encode(MsgType.EXIT, rid, [(Tag.CODE, 3), (Tag.TIMED_OUT, 0), (Tag.TRUNCATED, 0)]))
    elif frame.type == MsgType.READ:
        writer.write(encode(MsgType.ERROR, rid, [(Tag.CODE, errno.ENOENT), (Tag.MESSAGE, "/nope: gone")]))
    await writer.drain()


def pool_for(tmp_path: Path, **kwargs: object) -> GuestAgentPool:
    async def connect(vm_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(str(tmp_path / f"{vm_id}.sock"))

    return GuestAgentPool(connect, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[GuestAgentPool]:
    p = pool_for(tmp_path, limits=ChannelLimits(max_stream_bytes=4096, stray_frames=8), first_backoff=0.3)
    yield p
    await p.close()


async def test_concurrent_requests_are_matched_by_id(tmp_path: Path, pool: GuestAgentPool) -> None:
    async with FakeGuest(tmp_path / "a.sock", polite):
        slow = asyncio.create_task(pool.exec("a", ExecCommand(("sleep", "0.3")), 5))
        fast = await pool.exec("a", ExecCommand(("echo", "hi"), stdin=b"\0in\xff"), 5)
        assert (fast.exit_code, fast.stdout, fast.stderr) == (3, b"echo hi", b"\0in\xff")
        assert not slow.done()
        assert (await slow).stdout == b"sleep 0.3"


async def test_guest_errors_map_to_api_codes(tmp_path: Path, pool: GuestAgentPool) -> None:
    async with FakeGuest(tmp_path / "a.sock", polite):
        with pytest.raises(MetaldError) as e:
            await pool.read_file("a", "/nope")
        assert (e.value.code, e.value.reason) == (ErrorCode.NOT_FOUND, "GUEST_FILE_NOT_FOUND")


async def test_no_socket_is_agent_unavailable(pool: GuestAgentPool) -> None:
    with pytest.raises(MetaldError) as e:
        await pool.exec("missing", ExecCommand(("true",)), 1)
    assert (e.value.code, e.value.reason) == (ErrorCode.UNAVAILABLE, "AGENT_UNAVAILABLE")
    assert await pool.ping("missing", 0.3) is False


async def test_a_silent_agent_times_out(tmp_path: Path, pool: GuestAgentPool) -> None:
    async def silent(frame: Frame, writer: asyncio.StreamWriter) -> None:
        return

    async with FakeGuest(tmp_path / "a.sock", silent):
        started = time.monotonic()
        assert await pool.ping("a", 0.5) is False
        assert time.monotonic() - started < 1.5


def hostile(payload: Callable[[Frame], bytes]) -> Handler:
    async def answer(frame: Frame, writer: asyncio.StreamWriter) -> None:
        writer.write(payload(frame))
        await writer.drain()

    return answer


HOSTILE = {
    "garbage": lambda f: b"ping hello\n" + bytes(range(256)),
    "huge length prefix": lambda f: (
        bytes([0xF5, 1, MsgType.FILE, 0]) + f.request_id.to_bytes(4, "big") + b"\xff" * 4
    ),
    "bad version": lambda f: bytes([0xF5, 9]) + encode(MsgType.PONG, f.request_id)[2:],
    "fields overrun": lambda f: encode(MsgType.PONG, f.request_id)[:8] + b"\0\0\0\x05\x08\0\0\x01\0",
    "wrong answer type": lambda f: encode(MsgType.FILE, f.request_id),
    "flood of stray frames": lambda f: encode(MsgType.OUTPUT, f.request_id + 1000) * 100,
    "output over the cap": lambda f: encode(
        MsgType.OUTPUT, f.request_id, [(Tag.STREAM, 1), (Tag.DATA, b"x" * 5000)]
    ),
}


@pytest.mark.parametrize("attack", list(HOSTILE))
async def test_hostile_agent_resets_only_its_own_channel(
    tmp_path: Path, pool: GuestAgentPool, attack: str
) -> None:
    async with (
        FakeGuest(tmp_path / "bad.sock", hostile(HOSTILE[attack])) as bad,
        FakeGuest(tmp_path / "good.sock", polite),
    ):
        good_run = asyncio.create_task(pool.exec("good", ExecCommand(("sleep", "0.2")), 5))
        started = time.monotonic()
        with pytest.raises(MetaldError) as e:
            await pool.exec("bad", ExecCommand(("true",)), 30)
        assert time.monotonic() - started < 2, "the violation must end the request at once"
        assert (e.value.code, e.value.reason) == (ErrorCode.UNAVAILABLE, "AGENT_UNAVAILABLE")
        assert "protocol violation" in e.value.message
        await asyncio.sleep(0.05)
        assert bad.disconnects == 1  # the host closed the connection
        # Backoff: the next call is refused without connecting; afterwards the channel reopens.
        with pytest.raises(MetaldError, match="retry in"):
            await pool.exec("bad", ExecCommand(("true",)), 1)
        assert bad.connections == 1
        await asyncio.sleep(0.35)
        with pytest.raises(MetaldError):
            await pool.exec("bad", ExecCommand(("true",)), 1)
        assert bad.connections == 2
        assert (await good_run).exit_code == 3
        assert await pool.ping("good", 1)


async def test_idle_channel_is_closed_and_reopened(tmp_path: Path) -> None:
    pool = pool_for(tmp_path, idle_seconds=0.1)
    try:
        async with FakeGuest(tmp_path / "a.sock", polite) as guest:
            assert await pool.ping("a", 1)
            assert await pool.ping("a", 1)
            assert guest.connections == 1
            await asyncio.sleep(0.3)
            assert guest.disconnects == 1
            assert await pool.ping("a", 1)
            assert guest.connections == 2
            ids = [f.request_id for f in guest.received]
            assert len(set(ids)) == 3, "request ids are not reused across connections"
    finally:
        await pool.close()


async def test_late_answers_for_an_earlier_connection_are_ignored(tmp_path: Path) -> None:
    """A guest that answers a request given up on, after the host reconnected: never mistaken for
    the answer to a new request."""
    pool = pool_for(tmp_path, idle_seconds=0.05)
    seen: list[int] = []

    async def late(frame: Frame, writer: asyncio.StreamWriter) -> None:
        if seen:  # answer the previous request's id first, then this one
            writer.write(encode(MsgType.PONG, seen[-1]))
        seen.append(frame.request_id)
        writer.write(encode(MsgType.PONG, frame.request_id))
        await writer.drain()

    try:
        async with FakeGuest(tmp_path / "a.sock", late):
            assert await pool.ping("a", 1)
            await asyncio.sleep(0.15)
            assert await pool.ping("a", 1)
            assert len(seen) == 2 and seen[0] != seen[1]
    finally:
        await pool.close()
