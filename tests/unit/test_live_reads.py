"""GetVmInfo's live reads (runtime, metrics, links) are shared by the calls about an unchanged
record that arrive while one runs, and read anew once it finished or after a write."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta

from metald.domain.model import Vm, VmConfig
from metald.domain.states import VmState
from metald.ports import VmMetrics
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
        number = self.reads
        await self.release.wait()
        return None, VmMetrics(cpu_time_nanos=number), None


async def test_concurrent_calls_share_one_read() -> None:
    live, read, vm = LiveReads(), Counting(), _vm()
    callers = [asyncio.ensure_future(live.read(vm, read)) for _ in range(5)]
    await asyncio.sleep(0.01)
    callers[0].cancel()  # one caller going away does not end the others' read
    read.release.set()
    results = await asyncio.gather(*callers[1:])
    assert read.reads == 1 and all(r[1].cpu_time_nanos == 1 for r in results)
    assert live._running == {}  # finished: forgotten
    assert (await live.read(vm, read))[1].cpu_time_nanos == 2  # a call after it reads anew


async def test_a_record_write_reads_anew() -> None:
    live, read, vm = LiveReads(), Counting(), _vm()
    read.release.set()
    await live.read(vm, read)
    written = dataclasses.replace(
        vm, state=VmState.PAUSED, updated_at=vm.updated_at + timedelta(microseconds=1)
    )
    assert (await live.read(written, read))[1].cpu_time_nanos == 2
    assert (await live.read(dataclasses.replace(written, state=VmState.RUNNING), read))[1].cpu_time_nanos == 3
    assert (await live.read(vm, read))[1].cpu_time_nanos == 4


async def test_a_call_after_a_write_does_not_join_the_read_before_it() -> None:
    live, read, vm = LiveReads(), Counting(), _vm()
    before = asyncio.ensure_future(live.read(vm, read))
    await asyncio.sleep(0)
    written = dataclasses.replace(vm, updated_at=vm.updated_at + timedelta(microseconds=1))
    after = asyncio.ensure_future(live.read(written, read))
    await asyncio.sleep(0)
    read.release.set()
    assert [r[1].cpu_time_nanos for r in await asyncio.gather(before, after)] == [1, 2]
