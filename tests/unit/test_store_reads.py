"""The SQLite VM records' read cache: an answer is kept only if no write moved in while it was
read, a write forgets what it may change, and callers never share the kept record."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from metald.domain.model import Vm, VmConfig
from metald.domain.states import VmState
from metald.store.sqlite_reads import RecordReads


def _vm(vm_id: str = "vm_a", state: VmState = VmState.CREATED) -> Vm:
    now = datetime.now(UTC)
    return Vm(vm_id, "acme", VmConfig(), state, now, now)


class Reading:
    """A read that answers `answer` (and counts itself), held until `release` if `hold`."""

    def __init__(self, answer: Vm | None, hold: bool = False) -> None:
        self.answer, self.reads = answer, 0
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def __call__(self) -> Vm | None:
        self.reads += 1
        await self.release.wait()
        return self.answer


async def test_a_record_is_read_once_until_its_write_and_handed_out_as_copies() -> None:
    reads, read = RecordReads(), Reading(_vm())
    first = await reads.record("vm_a", read)
    second = await reads.record("vm_a", read)
    assert read.reads == 1 and first == second and first is not second
    assert second is not None
    second.state = VmState.RUNNING  # a caller changing its copy changes nothing kept
    assert (await reads.record("vm_a", read)).state is VmState.CREATED  # type: ignore[union-attr]
    with reads.writing("vm_b"):
        pass
    await reads.record("vm_a", read)
    assert read.reads == 1  # another VM's write leaves this record
    with reads.writing("vm_a"):
        pass
    await reads.record("vm_a", read)
    assert read.reads == 2


async def test_a_missing_record_is_not_kept() -> None:
    reads, read = RecordReads(), Reading(None)
    assert await reads.record("vm_a", read) is None
    assert await reads.record("vm_a", read) is None
    assert read.reads == 2


async def test_an_answer_read_while_a_write_ran_is_not_kept() -> None:
    reads, old = RecordReads(), Reading(_vm(), hold=True)
    reading = asyncio.ensure_future(reads.record("vm_a", old))
    await asyncio.sleep(0)
    with reads.writing("vm_a"):
        old.release.set()
        assert (await reading).state is VmState.CREATED  # type: ignore[union-attr]
    new = Reading(_vm(state=VmState.RUNNING))
    assert (await reads.record("vm_a", new)).state is VmState.RUNNING  # type: ignore[union-attr]
    counting = Counts()
    held = asyncio.ensure_future(reads.count("acme", (), counting.held))
    await asyncio.sleep(0)
    with reads.writing("vm_z"):
        pass
    counting.release.set()
    assert await held == 1
    assert await reads.count("acme", (), counting.held) == 2  # the one read across a write: not kept


class Counts:
    def __init__(self) -> None:
        self.reads = 0
        self.release = asyncio.Event()

    async def held(self) -> int:
        self.reads += 1
        number = self.reads
        await self.release.wait()
        return number


async def test_counts_are_kept_per_filter_until_any_write() -> None:
    reads, counting = RecordReads(), Counts()
    counting.release.set()
    assert await reads.count("acme", (VmState.RUNNING,), counting.held) == 1
    assert await reads.count("acme", (VmState.RUNNING,), counting.held) == 1
    assert await reads.count("acme", (), counting.held) == 2
    assert await reads.count("globex", (VmState.RUNNING,), counting.held) == 3
    with reads.writing("vm_a"):
        pass
    assert await reads.count("acme", (VmState.RUNNING,), counting.held) == 4


async def test_the_kept_answers_are_bounded() -> None:
    reads = RecordReads(records=2, counts=2)
    for vm_id in ("vm_a", "vm_b", "vm_c"):
        await reads.record(vm_id, Reading(_vm(vm_id)))
    again = Reading(_vm("vm_a"))
    await reads.record("vm_a", again)
    assert again.reads == 1  # the oldest went
    still = Reading(_vm("vm_c"))
    await reads.record("vm_c", still)
    assert still.reads == 0
