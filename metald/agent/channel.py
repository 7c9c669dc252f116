"""One connection to one VM's guest agent: many requests at once, matched by request id.

Nothing the guest sends can make the daemon use unbounded memory or time: the header is checked
before a payload is read (at most MAX_PAYLOAD), an exec's output is capped per stream, frames for no
pending request have a small budget, and every request has a deadline. Any violation closes the
channel: its requests fail with AgentUnavailable, and the pool decides when to reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from metald.agent.protocol import (
    HEADER,
    MAX_DATA,
    MAX_PAYLOAD,
    FieldValue,
    Frame,
    MsgType,
    ProtocolError,
    Tag,
    encode,
    parse_fields,
    parse_header,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelLimits:
    max_payload: int = MAX_PAYLOAD
    max_stream_bytes: int = MAX_DATA
    max_in_flight: int = 32
    # Frames for no pending request (answers to requests given up on): tolerated up to these.
    stray_frames: int = 256
    stray_bytes: int = 4 * MAX_DATA


class AgentUnavailable(Exception):
    """The agent did not answer, or its channel is closed."""


class GuestError(Exception):
    """The agent answered ERROR: `errno` (the guest's, Linux numbering) and its message."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass
class ExecOutput:
    """What an exec collected: both streams, then its EXIT frame."""

    limit: int
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    exit: Frame | None = None


@dataclass(frozen=True)
class AgentCall:
    """One request: its type and fields, the answer types that end it, how long the whole exchange
    may take, and where an exec's streamed output goes."""

    msg_type: MsgType
    fields: Iterable[tuple[Tag, FieldValue]]
    answers: tuple[MsgType, ...]
    timeout: float
    output: ExecOutput | None = None


class _Pending:
    """One request waiting for its answer; `on_frame` raises ProtocolError for a frame that cannot
    belong to it."""

    def __init__(self, answers: frozenset[int], output: ExecOutput | None = None) -> None:
        self.answers = answers
        self.output = output
        self.done: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()

    def on_frame(self, frame: Frame) -> None:
        if frame.type == MsgType.ERROR:
            self.done.set_exception(GuestError(frame.integer(Tag.CODE), frame.text(Tag.MESSAGE)))
        elif frame.type == MsgType.OUTPUT and self.output is not None:
            self._append(frame)
        elif frame.type in self.answers:
            self.done.set_result(frame)
        else:
            raise ProtocolError(f"unexpected frame type {frame.type} for request {frame.request_id}")

    def _append(self, frame: Frame) -> None:
        assert self.output is not None
        stream = frame.integer(Tag.STREAM)
        if stream not in (1, 2):
            raise ProtocolError(f"output for stream {stream}")
        buf = self.output.stdout if stream == 1 else self.output.stderr
        data = frame.raw(Tag.DATA) or b""
        if len(buf) + len(data) > self.output.limit:
            raise ProtocolError(f"output beyond the {self.output.limit}-byte limit")  # the agent caps it
        buf += data

    def fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
            self.done.exception()  # retrieved: a request given up on must not log "never retrieved"


class AgentChannel:
    """Requests to one agent over one stream; `next_id` hands out request ids (kept by the owner
    across connections, so a late answer meant for an earlier connection never matches)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        name: str,
        next_id: Callable[[], int],
        limits: ChannelLimits | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._name = name
        self._next_id = next_id
        self._limits = limits or ChannelLimits()
        self._pending: dict[int, _Pending] = {}
        self._slots = asyncio.Semaphore(self._limits.max_in_flight)
        self._send_lock = asyncio.Lock()
        self._stray_frames = 0
        self._stray_bytes = 0
        self.closed_because: str | None = None
        self.violation = False  # closed for something the guest sent
        self._kills: set[asyncio.Task[None]] = set()
        self._reading = asyncio.create_task(self._read_loop(), name=f"agent-reader-{name}")

    @property
    def open(self) -> bool:
        return self.closed_because is None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def request(self, call: AgentCall) -> Frame:
        """Send one request and wait up to its timeout for its answer (the whole exchange, sending
        included). A caller that gives up (timeout, cancellation) asks the agent to kill the request."""
        try:
            async with asyncio.timeout(call.timeout), self._slots:
                if not self.open:
                    raise AgentUnavailable(f"agent channel closed: {self.closed_because}")
                request_id = self._fresh_id()
                pending = _Pending(frozenset(call.answers), call.output)
                self._pending[request_id] = pending
                try:
                    await self._send(encode(call.msg_type, request_id, call.fields))
                    return await asyncio.shield(pending.done)
                except BaseException:
                    if call.msg_type == MsgType.EXEC and self.open:
                        kill = asyncio.get_running_loop().create_task(self._kill(request_id))
                        self._kills.add(kill)
                        kill.add_done_callback(self._kills.discard)
                    raise
                finally:
                    self._pending.pop(request_id, None)
                    pending.fail(AgentUnavailable("request given up"))
        except TimeoutError:
            raise AgentUnavailable(f"agent did not answer within {call.timeout:.1f}s") from None

    def _fresh_id(self) -> int:
        while (request_id := self._next_id()) in self._pending:
            continue
        return request_id

    async def _kill(self, request_id: int) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self._send(encode(MsgType.KILL, request_id))

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                self._writer.write(data)
                await self._writer.drain()  # waits while the transport holds more than its high mark
            except (ConnectionError, OSError) as e:
                self.close(f"write failed: {e}")
                raise AgentUnavailable(f"agent channel closed: {e}") from e

    async def _read_loop(self) -> None:
        try:
            while True:
                header = await self._reader.readexactly(HEADER.size)
                msg_type, request_id, length = parse_header(header, self._limits.max_payload)
                payload = await self._reader.readexactly(length) if length else b""
                self._dispatch(Frame(msg_type, request_id, parse_fields(payload)), HEADER.size + length)
        except asyncio.CancelledError:
            raise
        except ProtocolError as e:
            log.warning("agent channel %s: protocol violation, resetting: %s", self._name, e)
            self.violation = True
            self.close(f"protocol violation: {e}")
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            self.close("connection closed")

    def _dispatch(self, frame: Frame, size: int) -> None:
        pending = self._pending.get(frame.request_id)
        if pending is not None and not pending.done.done():
            pending.on_frame(frame)
            return
        self._stray_frames += 1
        self._stray_bytes += size
        if self._stray_frames > self._limits.stray_frames or self._stray_bytes > self._limits.stray_bytes:
            raise ProtocolError(f"{self._stray_frames} frames ({self._stray_bytes} bytes) for no request")

    def close(self, because: str) -> None:
        """Close the connection and fail every pending request. Idempotent."""
        if self.closed_because is not None:
            return
        self.closed_because = because
        for pending in self._pending.values():
            pending.fail(AgentUnavailable(f"agent channel closed: {because}"))
        self._writer.close()
        if asyncio.current_task() is not self._reading:
            self._reading.cancel()

    async def aclose(self, because: str = "closed by the host") -> None:
        self.close(because)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reading
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


def request_ids(start: int) -> Iterator[int]:
    """1..2**32-1 from `start`, round and round (0 is never used)."""
    value = start
    while True:
        value = value % 0xFFFFFFFF + 1
        yield value
