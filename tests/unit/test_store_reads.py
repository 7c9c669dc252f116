"""The SQLite VM records' read cache: an answer is kept only if no write moved in while it was
read, a write forgets what it may change, and callers never share the kept record."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Generic, TypeVar

from metald.domain.model import Vm, VmConfig
from metald.domain.states import VmState
from metald.store.sqlite_reads import RecordReads

T = TypeVar("T")


def _vm(vm_id: str = "vm_a", state: VmState = VmState.CREATED) -> Vm:
    now = datetime.now(UTC)
    return Vm(vm_id, "acme", VmConfig(), state, now, now)


class Reading(Generic[T]):
    """A read answering `answer(n)` for its n-th call, each held until `release` if `hold`."""

    def __init__(self, answer: Callable[[int], T], hold: bool = False) -> None:
        self.answer, self.reads, self.release = answer, 0, asyncio.Event()
        if not hold:
            self.release.set()

    async def __call__(self) -> T:
        self.reads += 1
        number = self.reads
        await self.release.wait()
        return self.answer(number)


def record(vm: Vm | None, hold: bool = False) -> Reading[Vm | None]:
    return Reading(lambda _: vm, hold)


def counts(hold: bool = False) -> Reading[int]:
    return Reading(lambda number: number, hold)


def pages(size: int = 2, hold: bool = False) -> Reading[list[Vm]]:
    """Pages of `size` fresh VMs, named after the read that made them (vm_1_0, vm_1_1, ...)."""
    return Reading(lambda number: [_vm(f"vm_{number}_{i}") for i in range(size)], hold)


async def test_a_record_is_read_once_until_its_write_and_handed_out_as_copies() -> None:
    reads, read = RecordReads(), record(_vm())
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
    reads, read = RecordReads(), record(None)
    assert await reads.record("vm_a", read) is None
    assert await reads.record("vm_a", read) is None
    assert read.reads == 2


async def test_an_answer_read_while_a_write_ran_is_not_kept() -> None:
    reads, old = RecordReads(), record(_vm(), hold=True)
    reading = asyncio.ensure_future(reads.record("vm_a", old))
    await asyncio.sleep(0)
    with reads.writing("vm_a"):  # submitted and finished while the read runs (it read before it)
        pass
    old.release.set()
    assert (await reading).state is VmState.CREATED  # type: ignore[union-attr]
    new = record(_vm(state=VmState.RUNNING))
    assert (await reads.record("vm_a", new)).state is VmState.RUNNING  # type: ignore[union-attr]
    counting = counts(hold=True)
    held = asyncio.ensure_future(reads.count("acme", (), counting))
    await asyncio.sleep(0)
    with reads.writing("vm_z"):
        pass
    counting.release.set()
    assert await held == 1
    assert await reads.count("acme", (), counting) == 2  # the one read across a write: not kept


async def test_counts_are_kept_per_filter_until_any_write() -> None:
    reads, counting = RecordReads(), counts()
    assert await reads.count("acme", (VmState.RUNNING,), counting) == 1
    assert await reads.count("acme", (VmState.RUNNING,), counting) == 1
    assert await reads.count("acme", (), counting) == 2
    assert await reads.count("globex", (VmState.RUNNING,), counting) == 3
    with reads.writing("vm_a"):
        pass
    assert await reads.count("acme", (VmState.RUNNING,), counting) == 4


async def test_a_page_is_kept_per_query_until_any_write_and_handed_out_as_copies() -> None:
    reads, paging = RecordReads(), pages()
    key = ("acme", (VmState.SHUTDOWN,), 0, 51)
    first = await reads.page(key, paging)
    second = await reads.page(key, paging)
    assert paging.reads == 1 and first == second
    assert all(a is not b for a, b in zip(first, second, strict=True))
    second[0].state = VmState.RUNNING  # a caller changing its copy changes nothing kept
    first[1].state = VmState.RUNNING  # nor does the reader whose read filled the cache
    assert [vm.state for vm in await reads.page(key, paging)] == [VmState.CREATED] * 2
    for other in (
        ("acme", (VmState.SHUTDOWN,), 7, 51),
        ("acme", (), 0, 51),
        ("globex", (VmState.SHUTDOWN,), 0, 51),
    ):
        await reads.page(other, paging)
    assert paging.reads == 4  # each query its own page
    with reads.writing("vm_elsewhere"):  # any write may move a VM into or out of any page
        pass
    assert (await reads.page(key, paging))[0].vm_id == "vm_5_0"


async def test_a_page_read_while_a_write_ran_is_not_kept() -> None:
    reads, paging = RecordReads(), pages(hold=True)
    key = ("acme", (), 0, 51)
    held = asyncio.ensure_future(reads.page(key, paging))
    await asyncio.sleep(0)
    with reads.writing("vm_a"):
        pass
    paging.release.set()
    assert (await held)[0].vm_id == "vm_1_0"
    assert (await reads.page(key, paging))[0].vm_id == "vm_2_0"
    assert (await reads.page(key, paging))[0].vm_id == "vm_2_0"


async def test_kept_pages_are_bounded_by_rows() -> None:
    reads = RecordReads(page_rows=5)
    keys = [("acme", (), after, 3) for after in (0, 10, 20)]
    for key in keys[:2]:
        await reads.page(key, pages(size=2))
    third = pages(size=2)
    await reads.page(keys[2], third)  # 6 rows: the oldest page goes
    again = [pages(size=2) for _ in keys]
    for key, paging in zip(keys[::-1], again, strict=True):
        await reads.page(key, paging)
    assert [paging.reads for paging in again] == [0, 0, 1]  # the third and second kept, the first dropped
    too_big = pages(size=6)
    await reads.page(("acme", (), 99, 6), too_big)
    await reads.page(("acme", (), 99, 6), too_big)
    assert too_big.reads == 2  # a page larger than the bound is never kept


async def test_the_kept_answers_are_bounded() -> None:
    reads = RecordReads(records=2, counts=2)
    for vm_id in ("vm_a", "vm_b", "vm_c"):
        await reads.record(vm_id, record(_vm(vm_id)))
    again = record(_vm("vm_a"))
    await reads.record("vm_a", again)
    assert again.reads == 1  # the oldest went
    still = record(_vm("vm_c"))
    await reads.record("vm_c", still)
    assert still.reads == 0
