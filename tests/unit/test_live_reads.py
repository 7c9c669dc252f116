"""GetVmInfo's live reads (runtime, metrics, links) are shared by calls close together about an
unchanged record, and read anew after a write or once LIVE_READ_MAX_AGE has passed."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from metald.domain.model import Vm, VmConfig
from metald.domain.states import VmState
from metald.ports import VmMetrics
from metald.service import queries
from metald.service.queries import Live, LiveReads


def _vm() -> Vm:
    now = datetime.now(UTC)
    return Vm("vm_a", "cust", VmConfig(), VmState.RUNNING, now, now)


class Counting:
    def __init__(self) -> None:
        self.reads = 0
        self.release = asyncio.Event()

    async def __call__(self) -> Live:
        self.reads += 1
        await self.release.wait()
        return None, VmMetrics(cpu_time_nanos=self.reads), None


async def test_concurrent_and_close_calls_share_one_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queries, "LIVE_READ_MAX_AGE", 10.0)
    live, read, vm = LiveReads(), Counting(), _vm()
    callers = [asyncio.ensure_future(live.read(vm, read)) for _ in range(5)]
    await asyncio.sleep(0.01)
    callers[0].cancel()  # one caller going away does not end the others' read
    read.release.set()
    results = await asyncio.gather(*callers[1:])
    assert read.reads == 1 and all(r[1].cpu_time_nanos == 1 for r in results)
    assert (await live.read(vm, read))[1].cpu_time_nanos == 1  # within the age: the same read


async def test_a_record_write_or_the_age_reads_anew(monkeypatch: pytest.MonkeyPatch) -> None:
    live, read, vm = LiveReads(), Counting(), _vm()
    read.release.set()
    await live.read(vm, read)
    written = dataclasses.replace(
        vm, state=VmState.PAUSED, updated_at=vm.updated_at + timedelta(microseconds=1)
    )
    assert (await live.read(written, read))[1].cpu_time_nanos == 2
    assert (await live.read(dataclasses.replace(written, state=VmState.RUNNING), read))[1].cpu_time_nanos == 3
    await asyncio.sleep(0.001)  # the default age is 0: a finished read is never reused
    assert (await live.read(vm, read))[1].cpu_time_nanos == 4
