"""Listening sockets that never let client connections use up the daemon's file descriptors.

A flood of idle connections used to take every descriptor, after which SQLite, QEMU's launch and
asset checks failed with EMFILE: 500s and even customer-blamed INVALID_ARGUMENTs. The daemon now
raises its soft RLIMIT_NOFILE to the hard limit at start, and accepts at most `cap` client
connections at once; beyond that each new connection gets an immediate HTTP 503 with a Connect
`unavailable` body (`Connection: close`) and is closed, so the descriptors below the cap stay free
for the work of the calls already being served.

asyncio accepts with `sock.accept()` on the socket it was given, so the cap is a socket subclass:
no event-loop or hypercorn internals are touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import socket
from collections.abc import Callable

log = logging.getLogger("metald")

_BODY = json.dumps({"code": "unavailable", "message": "too many open connections; retry later"}).encode()
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\nretry-after: 1\r\n\r\n%s" % (len(_BODY), _BODY)
)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


def connection_cap(setting: int, fd_limit: int) -> int:
    """Connections served at once: the setting, never more than half the descriptors."""
    half = max(fd_limit // 2, 1)
    return min(setting, half) if setting else half


class _Connection(socket.socket):
    """An accepted connection that gives its slot back when closed."""

    _release: Callable[[], None] | None = None

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()
        super().close()


class CappedListener(socket.socket):
    """A listening socket whose accept() refuses connections beyond `cap` open ones."""

    cap = 0
    open_connections = 0

    @classmethod
    def wrap(cls, sock: socket.socket, cap: int) -> CappedListener:
        listener = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        listener.cap = cap
        return listener

    def accept(self) -> tuple[socket.socket, object]:
        while True:
            fd, address = self._accept()  # type: ignore[attr-defined]
            conn = _Connection(self.family, self.type, self.proto, fileno=fd)
            if self.open_connections < self.cap:
                break
            _refuse(conn)
        if socket.getdefaulttimeout() is None and self.gettimeout():
            conn.setblocking(True)
        self.open_connections += 1
        conn._release = self._released
        return conn, address

    def _released(self) -> None:
        self.open_connections -= 1


def _refuse(conn: socket.socket) -> None:
    """Best effort: a 503 the client can read, then the end of the connection."""
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            conn.recv(65536)  # what already arrived, so that closing does not reset the answer
        conn.send(REFUSAL)
        conn.shutdown(socket.SHUT_WR)
    conn.close()
