"""Link state and counters of a network namespace in one rtnetlink dump, without spawning `ip`.

A netlink socket belongs to the namespace it was created in, so the socket is opened inside the
VM's namespace (setns on a dedicated thread, then back) and the dump runs on it: one RTM_GETLINK
request, answered with every link's name, flags and 64-bit counters. Nothing is cached between
reads: a kept socket would keep a deleted namespace alive.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import socket
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from metald.network.ip import NETNS_RUN_DIR

CLONE_NEWNET = 0x40000000
RTM_NEWLINK, RTM_GETLINK = 16, 18
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFLA_IFNAME, IFLA_STATS64 = 3, 23
IFF_UP = 0x1
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_RTATTR = struct.Struct("=HH")  # len, type
_STATS64 = struct.Struct("=4Q")  # rx_packets, tx_packets, rx_bytes, tx_bytes (first of 23+)
_RECV_BYTES = 1 << 16


@dataclass(frozen=True)
class Link:
    """One device as the namespace sees it: rx/tx are what the device received/sent."""

    name: str
    up: bool
    rx_bytes: int
    tx_bytes: int


class NetnsGone(Exception):
    """The namespace does not exist (any more)."""


def dump_request(seq: int) -> bytes:
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    return _NLMSG.pack(_NLMSG.size + len(body), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse(data: bytes) -> tuple[list[Link], bool]:
    """Links in a chunk of the dump answer, and whether the dump is done."""
    links: list[Link] = []
    for kind, payload in _messages(data):
        if kind == NLMSG_DONE:
            return links, True
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", payload)[0]
            if code:
                raise OSError(code, f"rtnetlink: {os.strerror(code)}")
            continue
        if kind == RTM_NEWLINK:
            links.append(_link(payload))
    return links, False


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            break
        yield kind, data[offset + _NLMSG.size : offset + length]
        offset += _align(length)


def _link(payload: bytes) -> Link:
    _family, _type, _index, flags, _change = _IFINFO.unpack_from(payload)
    name, rx, tx = "", 0, 0
    offset = _IFINFO.size
    while offset + _RTATTR.size <= len(payload):
        length, kind = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size:
            break
        value = payload[offset + _RTATTR.size : offset + length]
        if kind == IFLA_IFNAME:
            name = value.split(b"\0", 1)[0].decode(errors="replace")
        elif kind == IFLA_STATS64 and len(value) >= _STATS64.size:
            _rx_packets, _tx_packets, rx, tx = _STATS64.unpack_from(value)
        offset += _align(length)
    return Link(name, bool(flags & IFF_UP), rx, tx)


def _align(length: int) -> int:
    return (length + 3) & ~3


class LinkReader:
    """Reads namespaces' links off the event loop; concurrent reads of one namespace share one dump."""

    def __init__(self, netns_dir: Path = NETNS_RUN_DIR) -> None:
        self._dir = netns_dir
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._inflight: dict[str, asyncio.Future[list[Link]]] = {}
        self._libc = ctypes.CDLL(None, use_errno=True)

    async def links(self, netns: str) -> list[Link] | None:
        """Every link of a named namespace, or None if the namespace does not exist."""
        future = self._inflight.get(netns)
        if future is None:
            loop = asyncio.get_running_loop()
            future = asyncio.ensure_future(loop.run_in_executor(self._executor, self._read, netns))
            self._inflight[netns] = future
            future.add_done_callback(lambda _: self._inflight.pop(netns, None))
        try:
            return await asyncio.shield(future)
        except NetnsGone:
            return None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _read(self, netns: str) -> list[Link]:
        sock = self._socket_in(netns)
        try:
            sock.sendto(dump_request(1), (0, 0))
            links: list[Link] = []
            done = False
            while not done:
                chunk, done = parse(sock.recv(_RECV_BYTES))
                links += chunk
            return links
        finally:
            sock.close()

    def _socket_in(self, netns: str) -> socket.socket:
        try:
            target = os.open(self._dir / netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise NetnsGone(netns) from exc
            raise
        home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._setns(target, netns)
            try:
                return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
            finally:
                self._setns(home, "(home)")
        finally:
            os.close(target)
            os.close(home)

    def _setns(self, fd: int, what: str) -> None:
        if self._libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            if code == errno.EINVAL:  # the file is no namespace (an unmounted leftover): gone
                raise NetnsGone(what)
            raise OSError(code, f"setns into {what}: {os.strerror(code)}")
