"""What the SQLite VM records answered, kept until a write could change it: the records by id
(for GetVmInfo), and the listing pages and counts (ListVms and its `total_count`). Exact, never stale: the daemon is
the only writer of its database, and every write of the VM records goes through `writing`.

A write forgets the written VM's record and every page and count, and moves the generation on, both when
it is submitted and when it has finished; a read keeps its answer only if the generation did not
move while it ran. Statements run in submission order on the store's one thread, so an answer
kept is never older than a write already submitted. Callers get copies of kept records (the
service changes a record's fields before saving it)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TypeVar

from metald.domain.model import Vm
from metald.domain.states import VmState

CountKey = tuple[str, tuple[VmState, ...]]
PageKey = tuple[str, tuple[VmState, ...], int, int]  # customer, states, after seq, limit
K = TypeVar("K")
V = TypeVar("V")


class RecordReads:
    def __init__(self, records: int = 20_000, counts: int = 1_000, page_rows: int = 10_000) -> None:
        self._generation = 0
        self._records: dict[str, Vm] = {}
        self._counts: dict[CountKey, int] = {}
        self._pages: dict[PageKey, tuple[Vm, ...]] = {}
        self._page_rows = 0
        self._records_max = records
        self._counts_max = counts
        self._page_rows_max = page_rows

    @contextlib.contextmanager
    def writing(self, vm_id: str) -> Iterator[None]:
        """Around one write of `vm_id`'s record (insert, save, delete)."""
        self._written(vm_id)
        try:
            yield
        finally:
            self._written(vm_id)

    def _written(self, vm_id: str) -> None:
        self._generation += 1
        self._records.pop(vm_id, None)
        self._counts.clear()
        self._pages.clear()
        self._page_rows = 0

    async def record(self, vm_id: str, read: Callable[[], Awaitable[Vm | None]]) -> Vm | None:
        kept = self._records.get(vm_id)
        if kept is not None:
            return copy.copy(kept)
        generation = self._generation
        vm = await read()
        if vm is not None and generation == self._generation:
            bounded(self._records, self._records_max)[vm_id] = copy.copy(vm)
        return vm

    async def page(self, key: PageKey, read: Callable[[], Awaitable[list[Vm]]]) -> list[Vm]:
        kept = self._pages.get(key)
        if kept is not None:
            return [copy.copy(vm) for vm in kept]
        generation = self._generation
        rows = await read()
        if generation == self._generation:
            self._keep_page(key, tuple(copy.copy(vm) for vm in rows))
        return rows

    def _keep_page(self, key: PageKey, rows: tuple[Vm, ...]) -> None:
        """Keep `rows`, the oldest pages dropped until all kept pages hold at most `page_rows`."""
        if len(rows) > self._page_rows_max:
            return
        while self._pages and self._page_rows + len(rows) > self._page_rows_max:
            self._page_rows -= len(self._pages.pop(next(iter(self._pages))))
        self._pages[key] = rows
        self._page_rows += len(rows)

    async def count(
        self, customer_id: str, states: Sequence[VmState], read: Callable[[], Awaitable[int]]
    ) -> int:
        key = (customer_id, tuple(states))
        kept = self._counts.get(key)
        if kept is not None:
            return kept
        generation = self._generation
        count = await read()
        if generation == self._generation:
            bounded(self._counts, self._counts_max)[key] = count
        return count


def bounded(kept: dict[K, V], most: int) -> dict[K, V]:
    """`kept`, its oldest entry dropped if it holds `most`."""
    if len(kept) >= most:
        del kept[next(iter(kept))]
    return kept
