"""Link state and counters of a network namespace in one rtnetlink dump, without spawning `ip`.

A netlink socket belongs to the namespace it was created in, so the socket is opened inside the
VM's namespace (setns on a dedicated thread, then back) and the dump runs on it: one RTM_GETLINK
request, answered with every link's name, flags and 64-bit counters.

The socket is kept per namespace (no setns, no thread hop on later reads: the dump is answered from
kernel memory, so sending and receiving it on the event loop never waits), but never answers for a
namespace other than the one the name now refers to: each read first compares the name's inode
(a stat of /run/netns/NAME, tmpfs) with the kept socket's, and a socket whose namespace is no longer
there is closed. A kept socket keeps its namespace alive, so whoever deletes a namespace calls
`forget` after the deletion (NetworkManager.detach, remove_orphans): a read that opened a socket
while the deletion ran sees the name gone or changed before it keeps the socket.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import socket
import struct
import threading
from collections.abc import Collection, Iterator
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
_KEPT_MAX = 512  # sockets kept (one descriptor each); beyond, the oldest is closed


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


def parse(data: bytes, names: Collection[str] | None = None) -> tuple[list[Link], bool]:
    """Links in a chunk of the dump answer (only those called one of `names`, if given: the others
    are skipped at their first attribute), and whether the dump is done."""
    links: list[Link] = []
    for kind, start, end in _messages(data):
        if kind == NLMSG_DONE:
            return links, True
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, start)[0]
            if code:
                raise OSError(code, f"rtnetlink: {os.strerror(code)}")
            continue
        if kind == RTM_NEWLINK and (link := _link(data, start, end, names)) is not None:
            links.append(link)
    return links, False


def _messages(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(type, start, end) of each message's payload in `data`."""
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            break
        yield kind, offset + _NLMSG.size, min(offset + length, len(data))
        offset += _align(length)


def _link(data: bytes, start: int, end: int, names: Collection[str] | None) -> Link | None:
    """The name, flags and counters of one RTM_NEWLINK, None if not one of `names`. The kernel
    sends IFLA_IFNAME first and IFLA_STATS64 about 30 attributes in: the walk ends there and
    slices no other value."""
    if start + _IFINFO.size > end:
        return None
    _family, _type, _index, flags, _change = _IFINFO.unpack_from(data, start)
    name, rx, tx = None, 0, 0
    offset = start + _IFINFO.size
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            break
        if kind == IFLA_IFNAME:
            name = data[offset + _RTATTR.size : offset + length].split(b"\0", 1)[0].decode(errors="replace")
            if names is not None and name not in names:
                return None
        elif kind == IFLA_STATS64 and length - _RTATTR.size >= _STATS64.size:
            _rx_packets, _tx_packets, rx, tx = _STATS64.unpack_from(data, offset + _RTATTR.size)
            if name is not None:
                break
        offset += _align(length)
    if names is not None and name is None:
        return None
    return Link(name or "", bool(flags & IFF_UP), rx, tx)


def _align(length: int) -> int:
    return (length + 3) & ~3


class LinkReader:
    """Reads namespaces' links; concurrent reads of one namespace share one dump."""

    def __init__(self, netns_dir: Path = NETNS_RUN_DIR) -> None:
        self._dir = netns_dir
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._inflight: dict[tuple[str, frozenset[str] | None], asyncio.Future[list[Link]]] = {}
        self._kept: dict[str, tuple[socket.socket, tuple[int, int]]] = {}  # name: socket, (dev, inode)
        self._libc = ctypes.CDLL(None, use_errno=True)

    async def links(self, netns: str, names: frozenset[str] | None = None) -> list[Link] | None:
        """The links of a named namespace (those called one of `names`, if given), or None if the
        namespace does not exist."""
        key = netns, names
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._read(netns, names))
            self._inflight[key] = future
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        try:
            return await asyncio.shield(future)
        except NetnsGone:
            return None

    def forget(self, netns: str) -> None:
        """Close the socket kept for `netns` (after its deletion: the namespace is freed)."""
        kept = self._kept.pop(netns, None)
        if kept is not None:
            kept[0].close()

    def close(self) -> None:
        for netns in list(self._kept):
            self.forget(netns)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _read(self, netns: str, names: frozenset[str] | None) -> list[Link]:
        sock = await self._socket(netns)
        try:
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, dump_request(1))
            links: list[Link] = []
            done = False
            while not done:
                chunk, done = parse(await loop.sock_recv(sock, _RECV_BYTES), names)
                links += chunk
            return links
        except BaseException:  # a half-read answer must not be read as the next one's
            self.forget(netns)
            raise

    async def _socket(self, netns: str) -> socket.socket:
        """The kept socket of the namespace `netns` names now, opened if there is none."""
        named = self._named(netns)
        kept = self._kept.get(netns)
        if kept is not None and kept[1] == named:
            return kept[0]
        self.forget(netns)
        if named is None:
            raise NetnsGone(netns)
        loop = asyncio.get_running_loop()
        sock, opened = await loop.run_in_executor(self._executor, self._socket_in, netns)
        if self._named(netns) != opened:  # deleted or replaced while it opened: not kept
            sock.close()
            raise NetnsGone(netns)
        if len(self._kept) >= _KEPT_MAX:
            self.forget(next(iter(self._kept)))
        self._kept[netns] = (sock, opened)
        return sock

    def _named(self, netns: str) -> tuple[int, int] | None:
        """What the name refers to now (a stat on tmpfs: no disk wait), None if nothing."""
        try:
            return _identity(os.stat(self._dir / netns))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _socket_in(self, netns: str) -> tuple[socket.socket, tuple[int, int]]:
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
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
            finally:
                self._setns(home, "(home)")
            sock.setblocking(False)
            return sock, _identity(os.fstat(target))
        finally:
            os.close(target)
            os.close(home)

    def _setns(self, fd: int, what: str) -> None:
        if self._libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            if code == errno.EINVAL:  # the file is no namespace (an unmounted leftover): gone
                raise NetnsGone(what)
            raise OSError(code, f"setns into {what}: {os.strerror(code)}")


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino
