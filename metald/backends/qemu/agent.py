"""Client of the guest agent on virtio-serial port org.metald.agent (version 0: line protocol),
and the connector the v1 channel pool (metald/agent) reaches a QEMU VM's agent socket with.

`ping TOK` -> `pong TOK`; `reboot` / `poweroff` -> `ok`; `exec CMD` -> output lines, then `EXIT rc`.
The guest agent polls its port about once a second while no host client is connected, so the first
ping may wait that long, and pings sent before it listened may be answered late: replies carry the
token and stale ones are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from metald.backends.qemu import layout
from metald.backends.qemu.sockets import open_in_dir

_tokens = itertools.count(1)
_PING_INTERVAL = 0.5


AGENT_CONNECT_TIMEOUT = 1.0
AGENT_READ_LIMIT = 1 << 16  # StreamReader's buffer mark; frames are read with readexactly


def agent_connector(
    vms_dir: Path,
) -> Callable[[str], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    """Connects to vms_dir/<vm_id>/agent.sock (the listening socket QEMU accepts on)."""

    async def connect(vm_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await open_in_dir(
            vms_dir / vm_id, layout.AGENT_SOCKET, timeout=AGENT_CONNECT_TIMEOUT, limit=AGENT_READ_LIMIT
        )

    return connect


class GuestAgent:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, vm_dir: Path, *, timeout: float = 2.0) -> GuestAgent:
        reader, writer = await open_in_dir(vm_dir, layout.AGENT_SOCKET, timeout=timeout, limit=1 << 20)
        return cls(reader, writer)

    async def _send(self, line: str) -> None:
        self._writer.write(line.encode() + b"\n")
        await self._writer.drain()

    async def _readline(self, timeout: float) -> str:
        raw = await asyncio.wait_for(self._reader.readline(), timeout)
        if not raw:
            raise ConnectionError("guest agent connection closed")
        return raw.decode(errors="replace").rstrip("\r\n")

    async def ping(self, timeout: float) -> bool:
        """True once the agent answers; pings are repeated every 0.5 s until `timeout`."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            token = f"{os.getpid()}-{next(_tokens)}"
            await self._send(f"ping {token}")
            until = time.monotonic() + min(_PING_INTERVAL, left)
            try:
                while True:
                    if await self._readline(max(0.0, until - time.monotonic())) == f"pong {token}":
                        return True
            except TimeoutError:
                continue
        return False

    async def command(self, line: str, *, timeout: float = 5.0) -> str:
        """Send a one-line command (`reboot`, `poweroff`) and return the agent's one-line answer."""
        await self._send(line)
        while (reply := await self._readline(timeout)).startswith("pong "):
            continue  # late answers to earlier pings
        return reply

    async def exec(self, command: str, *, timeout: float = 30.0) -> tuple[int, str]:
        """Run a shell command in the guest: (exit code, combined stdout/stderr)."""
        await self._send(f"exec {command}")
        out: list[str] = []
        while True:
            line = await self._readline(timeout)
            if line.startswith("EXIT "):
                return int(line[5:]), "\n".join(out)
            if not (line.startswith("pong ") and not out):
                out.append(line)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
