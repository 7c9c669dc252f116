"""GuestAgentPool: metald.ports.GuestAgent over one AgentChannel per VM.

A channel is opened on first use and closed after `idle_seconds` without a user: QEMU's agent
socket takes one client at a time, and others (the backend's reboot over the v0 line protocol)
need it too. A channel closed for a protocol violation is not reopened for a while (backoff
doubling up to `max_backoff`), so a hostile guest costs the daemon one connection now and then.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

from metald.agent.channel import (
    AgentCall,
    AgentChannel,
    AgentUnavailable,
    ChannelLimits,
    ExecOutput,
    GuestError,
    request_ids,
)
from metald.agent.protocol import MAX_DATA, FieldValue, Frame, MsgType, Tag, sets_nics
from metald.domain.errors import ErrorCode, MetaldError, precondition, unavailable
from metald.domain.model import NicAddress
from metald.usecases import ExecCommand, ExecResult, GuestFile

Connector = Callable[[str], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

EXEC_GRACE = 5.0  # past the guest's own timeout, for its EXIT to arrive
FILE_TIMEOUT = 60.0
CONTROL_TIMEOUT = 5.0
PING_TRY = 1.0
PING_RETRY_INTERVAL = 0.05
# Sourced from the guest image (metald/guest/files/rootfs/etc/metald-net.sh).
_IDENTITY_SCRIPT = '. /etc/metald-net.sh && metald_identity "$@"'
_NICS_SCRIPT = '. /etc/metald-net.sh && metald_nics "$@"'

# The guest's errno (Linux numbering, as the host's) -> how the API reports it.
_GUEST_ERRORS: dict[int, tuple[ErrorCode, str]] = {
    errno.ENOENT: (ErrorCode.NOT_FOUND, "GUEST_FILE_NOT_FOUND"),
    errno.EFBIG: (ErrorCode.RESOURCE_EXHAUSTED, "FILE_TOO_LARGE"),
    errno.ENOSPC: (ErrorCode.RESOURCE_EXHAUSTED, "GUEST_DISK_FULL"),
    errno.EDQUOT: (ErrorCode.RESOURCE_EXHAUSTED, "GUEST_DISK_FULL"),
    errno.EAGAIN: (ErrorCode.RESOURCE_EXHAUSTED, "TOO_MANY_EXECS"),
    errno.EISDIR: (ErrorCode.INVALID_ARGUMENT, "INVALID_GUEST_PATH"),
    errno.ENOTDIR: (ErrorCode.INVALID_ARGUMENT, "INVALID_GUEST_PATH"),
    errno.ENAMETOOLONG: (ErrorCode.INVALID_ARGUMENT, "INVALID_GUEST_PATH"),
    errno.EINVAL: (ErrorCode.INVALID_ARGUMENT, "INVALID_GUEST_PATH"),
}


def agent_unavailable(vm_id: str, detail: str) -> MetaldError:
    return unavailable(
        "AGENT_UNAVAILABLE",
        f"the guest agent of VM {vm_id} is not answering ({detail}); retry once the guest is up",
        vm_id=vm_id,
    )


def guest_error(vm_id: str, exc: GuestError) -> MetaldError:
    code, reason = _GUEST_ERRORS.get(exc.errno, (ErrorCode.FAILED_PRECONDITION, "GUEST_IO_ERROR"))
    return MetaldError(code, f"in VM {vm_id}: {exc}", reason=reason, metadata={"vm_id": vm_id})


@dataclass
class _Vm:
    ids: Iterator[int]
    channel: AgentChannel | None = None
    users: int = 0
    idle: asyncio.TimerHandle | None = None
    blocked_until: float = 0.0
    backoff: float = 0.0


class GuestAgentPool:
    def __init__(
        self,
        connect: Connector,
        *,
        limits: ChannelLimits | None = None,
        idle_seconds: float = 2.0,
        connect_timeout: float = 2.0,
        first_backoff: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        self._connect = connect
        self._limits = limits or ChannelLimits()
        self._idle_seconds = idle_seconds
        self._connect_timeout = connect_timeout
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._vms: dict[str, _Vm] = {}
        self._connecting: dict[str, asyncio.Lock] = {}

    # ---- channels ---------------------------------------------------------------------------

    def _vm(self, vm_id: str) -> _Vm:
        if (vm := self._vms.get(vm_id)) is None:
            vm = self._vms[vm_id] = _Vm(request_ids(random.randrange(1, 0xFFFFFFFF)))
        return vm

    async def _open(self, vm_id: str, vm: _Vm) -> AgentChannel:
        async with self._connecting.setdefault(vm_id, asyncio.Lock()):
            if vm.channel is not None and vm.channel.open:
                return vm.channel
            if vm.channel is not None and vm.channel.violation:  # just reset: back off
                vm.backoff = min(self._max_backoff, vm.backoff * 2 or self._first_backoff)
                vm.blocked_until = time.monotonic() + vm.backoff
            vm.channel = None
            if (wait := vm.blocked_until - time.monotonic()) > 0:
                raise AgentUnavailable(f"channel reset after a protocol violation; retry in {wait:.1f}s")
            try:
                async with asyncio.timeout(self._connect_timeout):
                    reader, writer = await self._connect(vm_id)
            except (OSError, TimeoutError) as e:
                raise AgentUnavailable(f"cannot connect to the agent socket: {e or 'timed out'}") from e
            vm.channel = AgentChannel(
                reader, writer, name=vm_id, next_id=vm.ids.__next__, limits=self._limits
            )
            return vm.channel

    @contextlib.asynccontextmanager
    async def _use(self, vm_id: str) -> AsyncIterator[AgentChannel]:
        vm = self._vm(vm_id)
        vm.users += 1
        if vm.idle is not None:
            vm.idle.cancel()
            vm.idle = None
        try:
            yield await self._open(vm_id, vm)
        finally:
            vm.users -= 1
            if vm.users == 0 and vm.channel is not None:
                vm.idle = asyncio.get_running_loop().call_later(self._idle_seconds, self._close_idle, vm)
            if vm.channel is not None and not vm.channel.violation:
                vm.backoff = 0.0 if vm.channel.open else vm.backoff

    @staticmethod
    def _close_idle(vm: _Vm) -> None:
        vm.idle = None
        if vm.users == 0 and vm.channel is not None and not vm.channel.violation:
            vm.channel.close("idle")
            vm.channel = None

    async def _call(self, vm_id: str, call: AgentCall) -> Frame:
        try:
            async with self._use(vm_id) as channel:
                return await channel.request(call)
        except AgentUnavailable as e:
            raise agent_unavailable(vm_id, str(e)) from e
        except GuestError as e:
            raise guest_error(vm_id, e) from e

    async def forget(self, vm_id: str) -> None:
        vm = self._vms.pop(vm_id, None)
        if vm is not None and vm.idle is not None:
            vm.idle.cancel()
        if vm is not None and vm.channel is not None:
            await vm.channel.aclose("VM gone")

    async def close(self) -> None:
        for vm_id in list(self._vms):
            await self.forget(vm_id)

    # ---- operations ----------------------------------------------------------------------------

    async def exec(self, vm_id: str, command: ExecCommand, timeout: float) -> ExecResult:
        fields: list[tuple[Tag, FieldValue]] = [(Tag.ARG, arg) for arg in command.argv]
        fields += [(Tag.ENV, f"{key}={value}") for key, value in sorted(command.env.items())]
        if command.working_dir:
            fields.append((Tag.CWD, command.working_dir))
        if command.stdin:
            fields.append((Tag.STDIN, command.stdin))
        fields.append((Tag.TIMEOUT_MS, max(1, int(timeout * 1000))))
        output = ExecOutput(limit=self._limits.max_stream_bytes)
        frame = await self._call(
            vm_id, AgentCall(MsgType.EXEC, fields, (MsgType.EXIT,), timeout + EXEC_GRACE, output)
        )
        return ExecResult(
            exit_code=frame.integer(Tag.CODE),
            stdout=bytes(output.stdout),
            stderr=bytes(output.stderr),
            timed_out=bool(frame.integer(Tag.TIMED_OUT)),
            truncated=bool(frame.integer(Tag.TRUNCATED)),
        )

    async def write_file(self, vm_id: str, path: str, content: bytes, mode: int) -> None:
        fields: list[tuple[Tag, FieldValue]] = [(Tag.PATH, path), (Tag.MODE, mode), (Tag.DATA, content)]
        await self._call(vm_id, AgentCall(MsgType.WRITE, fields, (MsgType.OK,), FILE_TIMEOUT))

    async def read_file(self, vm_id: str, path: str) -> GuestFile:
        frame = await self._call(
            vm_id, AgentCall(MsgType.READ, [(Tag.PATH, path)], (MsgType.FILE,), FILE_TIMEOUT)
        )
        content = frame.raw(Tag.DATA) or b""
        if len(content) > MAX_DATA:  # the channel's frame limit allows a little more than a file
            raise agent_unavailable(vm_id, f"the agent sent a file of {len(content)} bytes")
        return GuestFile(content=content, mode=frame.integer(Tag.MODE), size_bytes=len(content))

    async def ping(self, vm_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                await self._call(vm_id, AgentCall(MsgType.PING, (), (MsgType.PONG,), min(PING_TRY, left)))
                return True
            except MetaldError:
                await asyncio.sleep(min(PING_RETRY_INTERVAL, max(0.0, deadline - time.monotonic())))
        return False

    async def clock_offset(self, vm_id: str) -> float:
        """Seconds the guest's wall clock is ahead of the host's (negative: behind), measured
        against the middle of one ping's round trip."""
        sent = time.time()
        frame = await self._call(vm_id, AgentCall(MsgType.PING, (), (MsgType.PONG,), CONTROL_TIMEOUT))
        received = time.time()
        return frame.integer(Tag.TIME_NS) / 1e9 - (sent + received) / 2

    async def set_clock(self, vm_id: str) -> None:
        fields = [(Tag.TIME_NS, time.time_ns())]
        await self._call(vm_id, AgentCall(MsgType.CLOCK, fields, (MsgType.OK,), CONTROL_TIMEOUT))

    async def add_entropy(self, vm_id: str, data: bytes) -> None:
        fields = [(Tag.DATA, data)]
        await self._call(vm_id, AgentCall(MsgType.ENTROPY, fields, (MsgType.OK,), CONTROL_TIMEOUT))

    async def set_identity(self, vm_id: str, guest_vm_id: str, nics: Sequence[NicAddress]) -> None:
        await self._net_script(vm_id, _IDENTITY_SCRIPT, guest_vm_id, *_nic_specs(nics))

    async def refresh(
        self, vm_id: str, guest_vm_id: str, nics: Sequence[NicAddress], entropy: bytes, timeout: float
    ) -> None:
        """A restored clone's clock, entropy, hostname, vm_id and NICs (MACs, addresses, default
        routes) in one REFRESH, sent as soon as the agent answers: no ping first (REFRESH is
        idempotent, so it is retried like a ping until `timeout`). An agent of version 2 ignores
        the NICs (its OK carries no version 3): they are then set through `ip`. An agent older
        than version 2 (ENOSYS) gets the separate requests instead."""
        deadline = time.monotonic() + timeout
        specs = _nic_specs(nics)
        while True:
            fields: list[tuple[Tag, FieldValue]] = [
                (Tag.TIME_NS, time.time_ns()), (Tag.DATA, entropy),
                (Tag.HOSTNAME, guest_vm_id), (Tag.VM_ID, guest_vm_id),
                *((Tag.NIC, spec) for spec in specs),
            ]  # fmt: skip
            call = AgentCall(
                MsgType.REFRESH, fields, (MsgType.OK,), min(PING_TRY, deadline - time.monotonic())
            )
            try:
                async with self._use(vm_id) as channel:
                    answer = await channel.request(call)
                break
            except AgentUnavailable as e:
                if deadline - time.monotonic() <= PING_RETRY_INTERVAL:
                    raise agent_unavailable(vm_id, str(e)) from e
                await asyncio.sleep(PING_RETRY_INTERVAL)
            except GuestError as e:
                if e.errno != errno.ENOSYS:
                    raise _identity_failed(vm_id, str(e)) from e
                await self.set_clock(vm_id)
                await self.add_entropy(vm_id, entropy)
                return await self.set_identity(vm_id, guest_vm_id, nics)
        if specs and not sets_nics(answer):
            await self._net_script(vm_id, _NICS_SCRIPT, *specs)

    async def _net_script(self, vm_id: str, script: str, *args: str) -> None:
        argv = ("sh", "-c", script, "metald-identity", *args)
        result = await self.exec(vm_id, ExecCommand(argv=argv), CONTROL_TIMEOUT)
        if result.exit_code != 0:
            detail = (result.stderr or result.stdout).decode(errors="replace").strip()[-500:]
            raise _identity_failed(vm_id, f"exit {result.exit_code}: {detail}")


def _identity_failed(vm_id: str, detail: str) -> MetaldError:
    return precondition(
        "GUEST_IDENTITY_FAILED", f"VM {vm_id}: setting the guest's identity failed ({detail})", vm_id=vm_id
    )


def _nic_specs(nics: Sequence[NicAddress]) -> list[str]:
    """metald-net.sh's NIC argument: MAC,IP4/PFX,GW4,IP6/PFX,GW6."""
    return [",".join((n.mac, n.guest_ipv4, n.gateway_ipv4, n.guest_ipv6, n.gateway_ipv6)) for n in nics]
