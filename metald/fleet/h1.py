"""A minimal HTTP/1.1 keep-alive client on the gateway's own event loop, for the forwarding fast
path (fastpath.py): one request per connection at a time, idle connections pooled per host, no
thread hand-off, no compression. Only what a host's hypercorn answers a unary call is read:
Content-Length or chunked bodies."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_IDLE_PER_HOST = 16
MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]  # names lower-cased
    body: bytes


class ProtocolError(Exception):
    """The host's answer was not an HTTP/1.1 response this client reads."""


@dataclass(frozen=True)
class Origin:
    host: str
    port: int
    authority: bytes

    @classmethod
    def of(cls, url: str) -> Origin | None:
        """The origin of a cleartext `http://` URL (None for anything else)."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            return None
        return cls(parts.hostname, parts.port or 80, parts.netloc.encode())


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()

    async def exchange(self, request: bytes) -> tuple[Response, bool]:
        """The response and whether the connection may be reused."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEAD_BYTES:
            raise ProtocolError("response head too large")
        status_line, *lines = head[:-4].split(b"\r\n")
        version, _, rest = status_line.partition(b" ")
        if version != b"HTTP/1.1":
            raise ProtocolError(f"not HTTP/1.1: {status_line[:40]!r}")
        headers = []
        length, chunked, keep = -1, False, True
        for line in lines:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            headers.append((name, value))
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.lower() == b"chunked"
            elif name == b"connection":
                keep = value.lower() != b"close"
        if chunked:
            body = await self._chunked()
        elif length >= 0:
            body = await self.reader.readexactly(length)
        else:
            body, keep = await self.reader.read(), False
        return Response(int(rest[:3]), headers, body), keep

    async def _chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self._trailers()
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    async def _trailers(self) -> None:
        while await self.reader.readuntil(b"\r\n") != b"\r\n":
            pass


class Http1Pool:
    """Idle keep-alive connections per origin; a request takes one (or opens one) and gives it back."""

    def __init__(self) -> None:
        self._idle: dict[Origin, list[_Connection]] = {}

    async def post(self, origin: Origin, path: str, headers: list[tuple[str, str]], body: bytes) -> Response:
        """POST `body`; a pooled connection the host closed meanwhile is replaced once (callers
        send only requests that are safe to send twice)."""
        head = [f"POST {path} HTTP/1.1\r\nhost: ".encode(), origin.authority]
        head += [f"\r\n{name}: {value}".encode() for name, value in headers]
        head.append(f"\r\ncontent-length: {len(body)}\r\n\r\n".encode())
        request = b"".join(head) + body
        idle = self._idle.setdefault(origin, [])
        while idle:
            connection = idle.pop()
            if connection.reader.at_eof():
                connection.close()
                continue
            try:
                return await self._send(origin, connection, request)
            except (ConnectionError, asyncio.IncompleteReadError):
                break  # closed by the host while idle: once more on a new connection
        reader, writer = await asyncio.open_connection(origin.host, origin.port)
        return await self._send(origin, _Connection(reader, writer), request)

    async def _send(self, origin: Origin, connection: _Connection, request: bytes) -> Response:
        try:
            response, keep = await connection.exchange(request)
        except BaseException:
            connection.close()
            raise
        idle = self._idle.setdefault(origin, [])
        if keep and len(idle) < MAX_IDLE_PER_HOST:
            idle.append(connection)
        else:
            connection.close()
        return response

    async def close(self) -> None:
        connections = [c for idle in self._idle.values() for c in idle]
        self._idle.clear()
        for connection in connections:
            connection.close()
            with contextlib.suppress(OSError):
                await connection.writer.wait_closed()
