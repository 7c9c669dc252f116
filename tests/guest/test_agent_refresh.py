"""REFRESH (agent version 2): a restored clone's clock, entropy, hostname and vm_id in one request,
and (version 3) its NICs too, against fake guests on UNIX sockets — one of version 3, one of
version 2 (NICs through `ip` after the refresh), one of version 1 (ENOSYS: the host falls back to
the separate requests) and one whose socket appears late."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from metald.agent.pool import GuestAgentPool
from metald.agent.protocol import Frame, MsgType, Tag, encode
from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.model import NicAddress
from tests.guest.test_agent_channel import FakeGuest, pool_for

ENTROPY = bytes(range(256))
NIC = NicAddress("eth0", "02:fc:00:00:00:07", "10.9.0.7/24", "10.9.0.1", "fd00::7/64", "fd00::1")


async def version2(frame: Frame, writer: asyncio.StreamWriter) -> None:
    """OK to REFRESH; an exec exits 0."""
    rid = frame.request_id
    if frame.type == MsgType.REFRESH:
        writer.write(encode(MsgType.OK, rid))
    elif frame.type == MsgType.EXEC:
        writer.write(encode(MsgType.EXIT, rid, [(Tag.CODE, 0), (Tag.TIMED_OUT, 0), (Tag.TRUNCATED, 0)]))
    await writer.drain()


async def version3(frame: Frame, writer: asyncio.StreamWriter) -> None:
    """OK with the agent's version to REFRESH: the NICs it named are set."""
    writer.write(encode(MsgType.OK, frame.request_id, [(Tag.VERSION, "3")]))
    await writer.drain()


async def refuses_mac(frame: Frame, writer: asyncio.StreamWriter) -> None:
    fields = [(Tag.CODE, errno.EADDRNOTAVAIL), (Tag.MESSAGE, "eth0: MAC: Cannot assign requested address")]
    writer.write(encode(MsgType.ERROR, frame.request_id, fields))
    await writer.drain()


async def version1(frame: Frame, writer: asyncio.StreamWriter) -> None:
    """What an agent of version 1 answers: REFRESH is an unknown type; the rest succeeds."""
    rid = frame.request_id
    if frame.type == MsgType.REFRESH:
        fields = [(Tag.CODE, errno.ENOSYS), (Tag.MESSAGE, "unknown message type")]
        writer.write(encode(MsgType.ERROR, rid, fields))
        await writer.drain()
    elif frame.type in (MsgType.CLOCK, MsgType.ENTROPY):
        writer.write(encode(MsgType.OK, rid))
        await writer.drain()
    else:
        await version2(frame, writer)


async def refuses_hostname(frame: Frame, writer: asyncio.StreamWriter) -> None:
    fields = [(Tag.CODE, errno.EPERM), (Tag.MESSAGE, "hostname: Operation not permitted")]
    writer.write(encode(MsgType.ERROR, frame.request_id, fields))
    await writer.drain()


def args(frame: Frame) -> list[str]:
    return [v.decode() for t, v in frame.fields if t == Tag.ARG]


async def test_one_request_sets_clock_entropy_hostname_and_vm_id(tmp_path: Path) -> None:
    pool = pool_for(tmp_path)
    async with FakeGuest(tmp_path / "c.sock", version2) as guest:
        before = time.time_ns()
        await pool.refresh("c", "vm-c", [], ENTROPY, timeout=5)
        after = time.time_ns()
    await pool.close()
    assert [f.type for f in guest.received] == [MsgType.REFRESH]  # no ping, no exec without NICs
    (frame,) = guest.received
    assert before <= frame.integer(Tag.TIME_NS) <= after
    assert frame.raw(Tag.DATA) == ENTROPY
    assert (frame.text(Tag.HOSTNAME), frame.text(Tag.VM_ID)) == ("vm-c", "vm-c")


async def test_an_agent_of_version_3_sets_the_nics_in_the_same_request(tmp_path: Path) -> None:
    pool = pool_for(tmp_path)
    second = NicAddress("eth1", "02:fc:00:00:01:07", "10.9.1.7/24")
    async with FakeGuest(tmp_path / "v3.sock", version3) as guest:
        await pool.refresh("v3", "vm-v3", [NIC, second], ENTROPY, timeout=5)
    await pool.close()
    assert [f.type for f in guest.received] == [MsgType.REFRESH]  # no exec: one round trip
    (frame,) = guest.received
    assert [v.decode() for t, v in frame.fields if t == Tag.NIC] == [
        "02:fc:00:00:00:07,10.9.0.7/24,10.9.0.1,fd00::7/64,fd00::1",
        "02:fc:00:00:01:07,10.9.1.7/24,,,",
    ]
    assert frame.text(Tag.HOSTNAME) == "vm-v3"


async def test_a_clone_with_nics_gets_them_readdressed_after_the_refresh(tmp_path: Path) -> None:
    pool = pool_for(tmp_path)
    async with FakeGuest(tmp_path / "n.sock", version2) as guest:
        await pool.refresh("n", "vm-n", [NIC], ENTROPY, timeout=5)
    await pool.close()
    assert [f.type for f in guest.received] == [MsgType.REFRESH, MsgType.EXEC]
    argv = args(guest.received[1])
    assert argv[:2] == ["sh", "-c"] and "metald_nics" in argv[2] and "metald_identity" not in argv[2]
    assert argv[4:] == ["02:fc:00:00:00:07,10.9.0.7/24,10.9.0.1,fd00::7/64,fd00::1"]  # no vm_id


async def test_an_agent_of_version_1_gets_the_separate_requests(tmp_path: Path) -> None:
    pool = pool_for(tmp_path)
    async with FakeGuest(tmp_path / "o.sock", version1) as guest:
        await pool.refresh("o", "vm-o", [NIC], ENTROPY, timeout=5)
    await pool.close()
    types = [f.type for f in guest.received]
    assert types == [MsgType.REFRESH, MsgType.CLOCK, MsgType.ENTROPY, MsgType.EXEC]
    assert guest.received[2].raw(Tag.DATA) == ENTROPY
    argv = args(guest.received[3])
    assert "metald_identity" in argv[2] and argv[4:] == [
        "vm-o",
        "02:fc:00:00:00:07,10.9.0.7/24,10.9.0.1,fd00::7/64,fd00::1",
    ]


async def test_the_refresh_waits_for_an_agent_that_comes_up_late(tmp_path: Path) -> None:
    pool = pool_for(tmp_path)
    refresh = asyncio.create_task(pool.refresh("l", "vm-l", [], ENTROPY, timeout=5))
    await asyncio.sleep(0.3)
    assert not refresh.done()
    async with FakeGuest(tmp_path / "l.sock", version2) as guest:
        await refresh
    await pool.close()
    assert [f.type for f in guest.received] == [MsgType.REFRESH]


async def test_no_agent_is_unavailable_after_the_timeout(tmp_path: Path) -> None:
    pool = pool_for(tmp_path)
    started = time.monotonic()
    with pytest.raises(MetaldError) as e:
        await pool.refresh("gone", "vm-gone", [], ENTROPY, timeout=0.4)
    assert (e.value.code, e.value.reason) == (ErrorCode.UNAVAILABLE, "AGENT_UNAVAILABLE")
    assert time.monotonic() - started < 2
    await pool.close()


@pytest.mark.parametrize(
    ("guest", "step"),
    [(refuses_hostname, "hostname"), (refuses_mac, "eth0: MAC")],  # a NIC fails as the ip path does
)
async def test_a_failed_step_is_reported_with_the_guests_reason(
    tmp_path: Path, guest: Callable[[Frame, asyncio.StreamWriter], Awaitable[None]], step: str
) -> None:
    pool: GuestAgentPool = pool_for(tmp_path)
    async with FakeGuest(tmp_path / "e.sock", guest):
        with pytest.raises(MetaldError) as e:
            await pool.refresh("e", "vm-e", [NIC], ENTROPY, timeout=5)
    await pool.close()
    assert (e.value.code, e.value.reason) == (ErrorCode.FAILED_PRECONDITION, "GUEST_IDENTITY_FAILED")
    assert step in e.value.message
