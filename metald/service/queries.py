"""Reads: GetVmInfo, ListVms and the console. A read never fails because a VM is changing state:
a runtime, metrics or network detail that cannot be read right now is left out, not an error.

GetVmInfo reads the VM's record every time; what it reads live beside it (QMP status and
counters, /proc, the netlink dump of its links) is shared by the calls about the same VM, with
the same record, that arrive while one read runs: concurrent pollers cost one live read, a call
made after another returned reads anew (so it sees the counters of a guest write in between), and
a boot, pause, reboot, stop or guest-ready change (each a record write, with a new `updated_at`)
is never answered from a read started before it."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TypeVar

from metald.domain.model import Vm
from metald.domain.paging import vm_page
from metald.domain.states import ACTIVE_STATES, VmState
from metald.ports import NetworkAttachment, VmMetrics, VmRuntime
from metald.service.launch import Launch
from metald.usecases import ConsoleChunk, Page, VmDetails

log = logging.getLogger("metald.service")
T = TypeVar("T")

Live = tuple[VmRuntime | None, VmMetrics, NetworkAttachment | None]


class LiveReads:
    """The live reads running, by VM and record version (last write and state): a caller asking
    while one runs awaits it; a finished read is forgotten at once (before its callers resume)."""

    def __init__(self) -> None:
        self._running: dict[tuple[str, datetime, VmState], asyncio.Future[Live]] = {}

    async def read(self, vm: Vm, fresh: Callable[[], Awaitable[Live]]) -> Live:
        key = (vm.vm_id, vm.updated_at, vm.state)
        running = self._running.get(key)
        if running is None:
            running = self._running[key] = asyncio.ensure_future(fresh())
            running.add_done_callback(lambda _: self._running.pop(key, None))
        return await asyncio.shield(running)  # one caller going away does not cancel the others' read


class Queries(Launch):
    @functools.cached_property
    def _live_reads(self) -> LiveReads:
        return LiveReads()

    async def info(self, customer_id: str, vm_id: str) -> VmDetails:
        vm = await self._owned(customer_id, vm_id)
        runtime, metrics, attachment = await self._live_reads.read(vm, lambda: self._read_live(vm))
        return VmDetails(vm, self.backend_type, runtime, metrics, attachment)

    async def _read_live(self, vm: Vm) -> Live:
        """The three reads, overlapping: QEMU's counters (a QMP round trip) are asked first and
        read last; the netlink dump and the runtime (QMP only while QEMU is not known to run) go
        in between, without a task of their own. Metrics only with a runtime."""
        vm_id = vm.vm_id
        active = vm.state in ACTIVE_STATES
        network = self._networked(vm)
        metrics_read = (
            asyncio.ensure_future(_known(vm_id, "metrics", lambda: self._backend.metrics(vm_id), VmMetrics()))
            if active
            else None
        )
        try:
            attachment = (
                await _known(vm_id, "network", lambda: network.describe(vm), None) if network else None
            )
            runtime = (
                await _known(vm_id, "runtime", lambda: self._backend.runtime(vm_id), None) if active else None
            )
            metrics = await metrics_read if metrics_read is not None else None
        finally:
            if metrics_read is not None:
                metrics_read.cancel()  # (done by then, unless this read itself was cancelled)
        if runtime is None or metrics is None:
            metrics = VmMetrics()
        if attachment is not None:
            counters = attachment.counters
            metrics = dataclasses.replace(
                metrics, network_rx_bytes=counters.guest_rx_bytes, network_tx_bytes=counters.guest_tx_bytes
            )
        return runtime, metrics, attachment

    async def list(
        self, customer_id: str, states: Sequence[VmState], page_size: int, page_token: str
    ) -> Page:
        page = vm_page(self._tokens, customer_id, states, page_size, page_token)
        rows = await self._vms.list_page(customer_id, page.states, page.after, page.fetch)
        rows, token = page.cut(self._tokens, rows)
        total = await self._vms.count(customer_id, page.states)
        return Page(rows, token, total)

    async def read_console(self, customer_id: str, vm_id: str, offset: int, limit: int) -> ConsoleChunk:
        path = self._console_path(await self._owned(customer_id, vm_id))
        return await asyncio.to_thread(_read_chunk, path, offset, limit)


async def _known(vm_id: str, what: str, read: Callable[[], Awaitable[T]], unknown: T) -> T:
    """What `read` answers, or `unknown` if it cannot be read now (the VM is between states)."""
    try:
        return await read()
    except Exception as exc:
        log.debug("%s of %s not readable now: %s", what, vm_id, exc, extra={"vm_id": vm_id})
        return unknown


def _read_chunk(path: os.PathLike[str], offset: int, limit: int) -> ConsoleChunk:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP):  # not written yet, or not a plain file
            return ConsoleChunk(b"", offset, 0)
        raise
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, limit, offset) if offset < size else b""
    finally:
        os.close(fd)
    return ConsoleChunk(data, offset + len(data), size)
