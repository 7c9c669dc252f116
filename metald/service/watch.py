"""WatchVms: the caller's VM events after a cursor, the kept ones from the store's event log first,
then live ones as they are written (woken by metald/service/transitions.py's notifier).

A cursor is the event's store sequence number as text. No cursor: only events from now on. A
cursor older than what the log keeps: OUT_OF_RANGE (CURSOR_EXPIRED), so the client re-lists.
Events are in the store, so a cursor stays good across daemon restarts: exactly once. The
watches of one customer read the log through one shared tail (metald/service/event_tail.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from metald.domain import ids
from metald.domain.errors import ErrorCode, invalid, refusal
from metald.domain.states import VmState, check_state_filter
from metald.service.base import ServiceBase
from metald.service.event_tail import WATCH_BATCH, CustomerTail
from metald.usecases import WatchItem


class Watch(ServiceBase):
    async def watch(
        self, customer_id: str, states: Sequence[VmState], vm_ids: Sequence[str], after_cursor: str
    ) -> AsyncIterator[WatchItem]:
        check_state_filter(states)
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
            raise refusal(
                ErrorCode.OUT_OF_RANGE,
                "CURSOR_EXPIRED",
                f"cursor {after} is older than the events this host keeps (oldest {first}); list the VMs again",
                after_cursor=cursor,
                oldest_cursor=str(first),
            )
        return after
