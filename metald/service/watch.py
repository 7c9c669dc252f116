"""WatchVms: the caller's VM events after a cursor, the kept ones from the store's event log first,
then live ones as they are written (woken by metald/service/transitions.py's notifier).

A cursor is the event's store sequence number as text. No cursor: only events from now on. A
cursor older than what the log keeps: OUT_OF_RANGE (CURSOR_EXPIRED), so the client re-lists.
Events are in the store, so a cursor stays good across daemon restarts: exactly once.

The watches of one customer share a `CustomerTail`: one store read per wake-up for all of them
(not one each, which made 100 watchers cost 100 queries per event on the store's one thread),
and a window of that customer's latest events in memory that serves every watch whose cursor
lies inside it. A watch behind the window (a resume from far back) reads the log itself until it
has caught up.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncIterator, Sequence

from metald.domain import ids
from metald.domain.errors import ErrorCode, MetaldError, invalid
from metald.domain.events import VmEvent
from metald.domain.states import VmState
from metald.ports import EventLog
from metald.service.base import ServiceBase
from metald.service.transitions import Notifier
from metald.usecases import WatchItem

WATCH_BATCH = 256
TAIL_WINDOW = 4096  # a customer's latest events kept in memory while it has watches


class CustomerTail:
    """One customer's latest events: all of them with `floor < seq <= read_up_to` (oldest first),
    refreshed from the log at most once per notification, whoever of its watches asks first."""

    def __init__(self, log: EventLog, notifier: Notifier, customer_id: str, start: int) -> None:
        self._log = log
        self._notifier = notifier
        self._customer = customer_id
        self._events: list[VmEvent] = []
        self._seqs: list[int] = []
        self._floor = start
        self._read_up_to = start
        self._seen: asyncio.Event | None = None  # the notifier's waiter as of the last complete read
        self._lock = asyncio.Lock()
        self.watches = 0

    async def after(self, seq: int) -> list[VmEvent]:
        """Up to WATCH_BATCH of the customer's events with a seq above `seq`, as the log has them
        now; empty when there are none yet."""
        if seq < self._floor:
            return await self._log.events_after(self._customer, seq, WATCH_BATCH)
        if self._notifier.waiter() is not self._seen:
            await self._refresh()
        first = bisect.bisect_right(self._seqs, seq)
        return self._events[first : first + WATCH_BATCH]

    async def _refresh(self) -> None:
        async with self._lock:
            waiter = self._notifier.waiter()  # what is written before it notified is read below
            while waiter is not self._seen:
                batch = await self._log.events_after(self._customer, self._read_up_to, WATCH_BATCH)
                if batch:
                    self._events += batch
                    self._seqs += [e.seq for e in batch]
                    self._read_up_to = batch[-1].seq
                if len(self._events) > 2 * TAIL_WINDOW:  # trimmed in halves: amortised O(1) an event
                    self._floor = self._seqs[-TAIL_WINDOW - 1]
                    del self._events[:-TAIL_WINDOW], self._seqs[:-TAIL_WINDOW]
                if len(batch) < WATCH_BATCH:
                    self._seen = waiter


class Watch(ServiceBase):
    async def watch(
        self, customer_id: str, states: Sequence[VmState], vm_ids: Sequence[str], after_cursor: str
    ) -> AsyncIterator[WatchItem]:
        if any(s is VmState.UNSPECIFIED for s in states):
            raise invalid("state_filter", "VM_STATE_UNSPECIFIED is not a state to filter by")
        for vm_id in vm_ids:
            if not ids.VM_ID_PATTERN.fullmatch(vm_id):
                raise invalid("vm_ids", f"{vm_id[:80]!r} does not match [A-Za-z0-9_-]{{1,64}}")
        wanted_states, wanted_ids = frozenset(states), frozenset(vm_ids)
        after = await self._cursor_start(after_cursor)
        tail = self._tails.get(customer_id)
        if tail is None:
            notifier = self._records.notifier
            tail = self._tails[customer_id] = CustomerTail(self._event_log, notifier, customer_id, after)
        tail.watches += 1
        try:
            while True:
                wake = self._records.notifier.waiter()
                batch = await tail.after(after)
                for event in batch:
                    after = event.seq
                    if wanted_states and event.state not in wanted_states:
                        continue
                    if wanted_ids and event.vm_id not in wanted_ids:
                        continue
                    yield WatchItem(str(event.seq), event)
                if len(batch) < WATCH_BATCH:
                    await wake.wait()
        finally:
            tail.watches -= 1
            if not tail.watches and self._tails.get(customer_id) is tail:
                del self._tails[customer_id]

    async def _cursor_start(self, cursor: str) -> int:
        last = await self._event_log.last_seq()
        if not cursor:
            return last
        if not cursor.isdigit() or len(cursor) > 19 or int(cursor) > last:
            raise invalid("after_cursor", "is not a cursor of this host")
        after = int(cursor)
        first = await self._event_log.first_seq() or last + 1  # 0: none kept (all pruned)
        if after + 1 < first:
            raise MetaldError(
                ErrorCode.OUT_OF_RANGE,
                f"cursor {after} is older than the events this host keeps (oldest {first}); list the VMs again",
                reason="CURSOR_EXPIRED",
                metadata={"after_cursor": cursor, "oldest_cursor": str(first)},
            )
        return after
