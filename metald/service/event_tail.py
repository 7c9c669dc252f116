"""The watches' shared tail of one customer's events (used by metald/service/watch.py).

The watches of one customer share a `CustomerTail`: one store read per wake-up for all of them
(not one each, which made 100 watchers cost 100 queries per event on the store's one thread),
and a window of that customer's latest events in memory that serves every watch whose cursor
lies inside it. A watch behind the window (a resume from far back) reads the log itself until it
has caught up. The store hands out seqs in commit order, so a read never skips an event.
"""

from __future__ import annotations

import asyncio
import bisect

from metald.domain.events import VmEvent
from metald.ports import EventLog
from metald.service.transitions import Notifier

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
