"""The rtnetlink link dump: message parsing, a vanished namespace, shared in-flight reads."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from pathlib import Path

import pytest

from metald.network import netlink
from metald.network.netlink import Link, LinkReader, NetnsGone


def _attr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def _message(kind: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 2, 1, 0) + body


def _newlink(name: str, flags: int, rx: int, tx: int) -> bytes:
    stats = struct.pack("=4Q", 3, 4, rx, tx) + b"\0" * 8 * 19  # the kernel sends 23+ counters
    body = struct.pack("=BxHiII", 0, 1, 7, flags, 0)
    body += _attr(netlink.IFLA_IFNAME, name.encode() + b"\0") + _attr(99, b"xyz") + _attr(23, stats)
    return _message(netlink.RTM_NEWLINK, body)


def test_dump_request_asks_for_every_link() -> None:
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", netlink.dump_request(5))
    assert (length, kind, seq) == (32, netlink.RTM_GETLINK, 5)
    assert flags == netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP


def test_parse_reads_names_flags_and_64_bit_counters() -> None:
    chunk = _newlink("tap_0a1b2c3d", 0x1043, 2**40, 17) + _newlink("br0", 0, 0, 0)
    links, done = netlink.parse(chunk)
    assert links == [Link("tap_0a1b2c3d", True, 2**40, 17), Link("br0", False, 0, 0)]
    assert not done
    assert netlink.parse(_message(netlink.NLMSG_DONE, b"\0" * 4)) == ([], True)


def test_parse_keeps_only_the_links_asked_for() -> None:
    chunk = _newlink("lo", 0x49, 5, 5) + _newlink("tap_0a1b2c3d", 0x1043, 9, 8) + _newlink("veth_x", 1, 1, 1)
    assert netlink.parse(chunk, frozenset({"tap_0a1b2c3d", "tap_other"})) == (
        [Link("tap_0a1b2c3d", True, 9, 8)],
        False,
    )
    assert netlink.parse(chunk, frozenset()) == ([], False)


def test_parse_raises_a_netlink_error() -> None:
    with pytest.raises(OSError, match="rtnetlink"):
        netlink.parse(_message(netlink.NLMSG_ERROR, struct.pack("=i", -1) + b"\0" * 16))


def test_parse_stops_at_a_truncated_message() -> None:
    assert netlink.parse(_newlink("up0", 1, 1, 2)[:10]) == ([], False)


async def test_a_missing_namespace_is_none_not_an_error(tmp_path: Path) -> None:
    reader = LinkReader(tmp_path)
    try:
        assert await reader.links("ns_vm_gone") is None
        (tmp_path / "ns_vm_leftover").write_text("")  # a file that is no (longer a) namespace
        assert await reader.links("ns_vm_leftover") is None
    finally:
        reader.close()


async def test_concurrent_reads_of_one_namespace_share_one_dump(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = LinkReader(tmp_path)
    calls: list[str] = []
    release = asyncio.Event()

    async def fake_read(netns: str, names: frozenset[str] | None) -> list[Link]:
        calls.append(netns)
        await asyncio.wait_for(release.wait(), 5)
        if netns == "gone":
            raise NetnsGone(netns)
        return [Link("tap", True, len(calls), 0)]

    monkeypatch.setattr(reader, "_read", fake_read)
    try:
        readers = [asyncio.ensure_future(reader.links("ns_a")) for _ in range(5)]
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(*readers)
        assert calls == ["ns_a"] and all(r == [Link("tap", True, 1, 0)] for r in results)
        assert await reader.links("ns_a") == [Link("tap", True, 2, 0)]  # a later read is fresh
        assert await reader.links("gone") is None
    finally:
        reader.close()


async def test_a_kept_socket_answers_only_for_the_namespace_the_name_refers_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name's file stands for the namespace; the socket is one of this process's namespace."""
    reader = LinkReader(tmp_path)
    opened: list[socket.socket] = []

    def fake_socket_in(netns: str) -> tuple[socket.socket, tuple[int, int]]:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        sock.setblocking(False)
        opened.append(sock)
        st = os.stat(tmp_path / netns)
        return sock, (st.st_dev, st.st_ino)

    monkeypatch.setattr(reader, "_socket_in", fake_socket_in)
    name = tmp_path / "ns_a"
    try:
        name.write_text("")
        assert "lo" in {link.name for link in await reader.links("ns_a") or []}
        assert await reader.links("ns_a") is not None
        assert len(opened) == 1  # the second read used the kept socket
        kept = name.with_name("kept")
        name.rename(kept)  # (held, so the new file cannot reuse its inode)
        name.write_text("")  # the name now refers to another namespace
        assert await reader.links("ns_a") is not None
        assert len(opened) == 2 and opened[0].fileno() == -1
        name.unlink()
        assert await reader.links("ns_a") is None
        assert opened[1].fileno() == -1  # gone: its socket is closed, nothing is kept
        name.write_text("")
        assert await reader.links("ns_a") is not None
        reader.forget("ns_a")  # what the deleter calls after deleting the namespace
        assert opened[2].fileno() == -1
    finally:
        reader.close()
