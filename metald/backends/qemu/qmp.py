"""A small asyncio QMP client: commands matched to replies by id, events handed to a callback.

It also knows when QEMU runs without asking: QEMU writes an event on a monitor before its answer
to any later command there, and every change of its run state away from "running" (stop, pause,
shutdown, panic, suspend, migration) or back to it sends one (STOP, RESUME, SUSPEND, ...). So a
query-status answer of "running" with no event read after it, or a RESUME, stays true until the
next event of any kind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metald.backends.qemu.sockets import open_in_dir

Event = dict[str, Any]


class QmpError(Exception):
    """QEMU answered a command with an error."""


class QmpClosedError(ConnectionError):
    """The QMP connection ended (QEMU exited) before the answer came."""


class QmpClient:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_event: Callable[[Event], None] | None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._on_event = on_event
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._events = 0  # events read so far
        self._running = False  # QEMU runs, and no event has been read since we learnt it
        self._reader_task: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()

    @classmethod
    async def connect(
        cls,
        vm_dir: Path,
        socket_name: str,
        *,
        timeout: float = 5.0,
        on_event: Callable[[Event], None] | None = None,
        alive: Callable[[], bool] = lambda: True,
    ) -> QmpClient:
        """Connect and negotiate capabilities; `alive` ends the wait for the socket early."""
        reader, writer = await open_in_dir(vm_dir, socket_name, timeout=timeout, limit=1 << 24, alive=alive)
        client = cls(reader, writer, on_event)
        try:
            greeting = json.loads(await asyncio.wait_for(reader.readline(), timeout))
            if "QMP" not in greeting:
                raise QmpError(f"unexpected QMP greeting: {greeting!r}")
            client._reader_task = asyncio.create_task(client._read_loop())
            await client.execute("qmp_capabilities", timeout=timeout)
        except BaseException:
            await client.close()
            raise
        return client

    @property
    def closed(self) -> bool:
        return self._reader_task is None or self._reader_task.done()

    async def _read_loop(self) -> None:
        try:
            while line := await self._reader.readline():
                msg = json.loads(line)
                if "event" in msg:
                    self._events += 1
                    self._running = msg["event"] == "RESUME"
                    if self._on_event is not None:
                        self._on_event(msg)
                elif (fut := self._pending.pop(msg.get("id", -1), None)) is not None and not fut.done():
                    fut.set_result((msg, self._events))
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            self._running = False
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(QmpClosedError("QMP connection closed"))
            self._pending.clear()

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 10.0
    ) -> Any:
        return (await self._call(command, arguments, timeout, fd=None))[0]

    async def status(self, *, timeout: float = 10.0) -> str:
        """QEMU's run state ("running", "paused", ...): no query-status while it is known to run."""
        if self._running:
            return "running"
        answer, events = await self._call("query-status", None, timeout, fd=None)
        status = str(answer.get("status", ""))
        if events == self._events:  # no event came after the answer
            self._running = status == "running"
        return status

    async def execute_with_fd(
        self, command: str, arguments: dict[str, Any] | None, fd: int, *, timeout: float = 10.0
    ) -> Any:
        """Send `command` with `fd` attached (SCM_RIGHTS), as `getfd` and `add-fd` need."""
        return (await self._call(command, arguments, timeout, fd=fd))[0]

    async def _call(
        self, command: str, arguments: dict[str, Any] | None, timeout: float, fd: int | None
    ) -> tuple[Any, int]:
        """The answer to `command`, and how many events had been read when it came."""
        if self._reader_task is not None and self._reader_task.done():
            raise QmpClosedError("QMP connection closed")
        self._next_id += 1
        msg_id = self._next_id
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        fut: asyncio.Future[tuple[dict[str, Any], int]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            async with self._send_lock:
                if fd is None:
                    self._writer.write(data)
                    await self._writer.drain()
                else:
                    await self._send_with_fd(data, fd)
            reply, events = await asyncio.wait_for(fut, timeout)
        except (ConnectionError, OSError) as e:
            raise QmpClosedError(str(e)) from e
        finally:
            self._pending.pop(msg_id, None)
        if "error" in reply:
            err = reply["error"]
            raise QmpError(f"{command}: {err.get('class')}: {err.get('desc')}")
        return reply.get("return"), events

    async def _send_with_fd(self, data: bytes, fd: int) -> None:
        """Ancillary data needs sendmsg on the socket itself: once the stream's buffer is empty (so
        the order of commands holds), through a duplicate of the connection's descriptor."""
        while self._writer.transport.get_write_buffer_size() > 0:
            await self._writer.drain()
            await asyncio.sleep(0)
        raw = self._writer.get_extra_info("socket")
        with socket.socket(fileno=os.dup(raw.fileno())) as sock:
            sock.setblocking(True)
            socket.send_fds(sock, [data], [fd])

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
