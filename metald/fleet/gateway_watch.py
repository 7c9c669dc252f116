"""WatchVms through the gateway: one stream per live host, merged as events arrive, under one
composite cursor that resumes every host where its events were left (docs/fleet.md).

The cursor is `fw1.` + base64url JSON `{"t": start, "h": {host_id: position}}`. A position is the
host's own cursor (its event seq) after the last event delivered from it, or `~seq`, a lower bound
taken from the seq the host last reported to the inventory (a host nothing came from yet): from a
lower bound, events dated before the watch started (`t`) are skipped, as they precede the watch.
Hosts that join, or come back, are picked up every few seconds; a host that is down keeps its
position in the cursor until it is back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from metald.api.convert import state_from_proto, state_to_proto
from metald.domain import ids
from metald.domain.errors import MetaldError, invalid
from metald.domain.events import VmEvent, VmEventType
from metald.domain.states import VmState
from metald.fleet import inventory
from metald.fleet.db import FleetDb
from metald.fleet.forward import HostClients
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.usecases import WatchItem

CURSOR_PREFIX = "fw1."
LOWER_BOUND = "~"
RESCAN_SECONDS = 2.0  # how often live hosts are looked up (hosts joining or back, streams lost)
MAX_CURSOR_CHARS = 16_384


@dataclass
class FleetCursor:
    started: float  # unix time the watch began
    positions: dict[str, str] = field(default_factory=dict)

    def encode(self) -> str:
        body = json.dumps({"t": self.started, "h": self.positions}, separators=(",", ":"))
        return CURSOR_PREFIX + base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> FleetCursor:
        bad = invalid("after_cursor", "is not a cursor of this fleet's WatchVms")
        if not text.startswith(CURSOR_PREFIX) or len(text) > MAX_CURSOR_CHARS:
            raise bad
        payload = text.removeprefix(CURSOR_PREFIX)
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            started, positions = float(data["t"]), dict(data["h"])
        except (ValueError, KeyError, TypeError):
            raise bad from None
        for host_id, position in positions.items():
            seq = str(position).removeprefix(LOWER_BOUND)
            if not isinstance(host_id, str) or not seq.isdigit() or len(seq) > 19:
                raise bad
        return cls(started, {str(k): str(v) for k, v in positions.items()})


def _event(host_event: pb.VmEvent, customer_id: str) -> VmEvent:
    at = host_event.at
    when = datetime.fromtimestamp(at.seconds + at.nanos / 1e9, UTC) if at else datetime.now(UTC)
    return VmEvent(
        host_event.vm_id,
        customer_id,
        VmEventType(int(host_event.type)),
        state_from_proto(host_event.state),
        state_from_proto(host_event.previous_state),
        host_event.reason,
        when,
    )


def check_filters(states: Sequence[VmState], vm_ids: Sequence[str]) -> None:
    """The same refusals as a host's, before any host is asked."""
    if any(s is VmState.UNSPECIFIED for s in states):
        raise invalid("state_filter", "VM_STATE_UNSPECIFIED is not a state to filter by")
    for vm_id in vm_ids:
        if not ids.VM_ID_PATTERN.fullmatch(vm_id):
            raise invalid("vm_ids", f"{vm_id[:80]!r} does not match [A-Za-z0-9_-]{{1,64}}")


_Arrival = tuple[str, pb.VmEvent | MetaldError | None]  # host id, then an event, an error or the end


class FleetWatch:
    def __init__(self, db: FleetDb, hosts: HostClients) -> None:
        self._db = db
        self._hosts = hosts

    async def watch(
        self, customer_id: str, states: Sequence[VmState], vm_ids: Sequence[str], after_cursor: str
    ) -> AsyncIterator[WatchItem]:
        check_filters(states, vm_ids)
        cursor = FleetCursor.decode(after_cursor) if after_cursor else FleetCursor(time.time())
        arrivals: asyncio.Queue[_Arrival] = asyncio.Queue(maxsize=1024)
        pumps: dict[str, asyncio.Task[None]] = {}
        request = pb.WatchVmsRequest(state_filter=[state_to_proto(s) for s in states], vm_ids=list(vm_ids))
        try:
            await self._open_streams(customer_id, cursor, request, pumps, arrivals)
            next_scan = time.monotonic() + RESCAN_SECONDS
            while True:
                try:
                    host_id, item = await asyncio.wait_for(
                        arrivals.get(), max(0.0, next_scan - time.monotonic())
                    )
                except TimeoutError:
                    await self._open_streams(customer_id, cursor, request, pumps, arrivals)
                    next_scan = time.monotonic() + RESCAN_SECONDS
                    continue
                if isinstance(item, MetaldError):
                    pumps.pop(host_id, None)
                    if item.reason != "HOST_UNAVAILABLE":  # the host's answer (CURSOR_EXPIRED, ...)
                        raise item
                    continue  # down: tried again at the next scan, from its position
                if item is None:
                    pumps.pop(host_id, None)
                    continue
                position = cursor.positions.get(host_id, "")
                cursor.positions[host_id] = item.cursor
                event = _event(item, customer_id)
                if position.startswith(LOWER_BOUND) and event.at.timestamp() < cursor.started:
                    continue  # from before the watch began
                yield WatchItem(cursor.encode(), event)
        finally:
            for task in pumps.values():
                task.cancel()
            for task in pumps.values():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _open_streams(
        self,
        customer_id: str,
        cursor: FleetCursor,
        request: pb.WatchVmsRequest,
        pumps: dict[str, asyncio.Task[None]],
        arrivals: asyncio.Queue[_Arrival],
    ) -> None:
        """A stream to every live host without one, from its position (or its reported seq)."""
        try:
            hosts = await inventory.hosts(self._db)
        except MetaldError:
            if not pumps and not cursor.positions:
                raise  # nothing to watch without the inventory
            return  # the database is away: the open streams run on
        for host in hosts:
            if not host.live or host.host_id in pumps:
                continue
            position = cursor.positions.setdefault(host.host_id, f"{LOWER_BOUND}{host.last_event_seq}")
            host_request = pb.WatchVmsRequest(
                state_filter=request.state_filter,
                vm_ids=request.vm_ids,
                after_cursor=position.removeprefix(LOWER_BOUND),
            )
            pumps[host.host_id] = asyncio.create_task(
                self._pump(host.host_id, host.url, customer_id, host_request, arrivals),
                name=f"watch-{host.host_id}",
            )

    async def _pump(
        self,
        host_id: str,
        url: str,
        customer_id: str,
        request: pb.WatchVmsRequest,
        arrivals: asyncio.Queue[_Arrival],
    ) -> None:
        try:  # aclosing: a cancelled pump closes its host stream now, not at garbage collection
            async with contextlib.aclosing(self._hosts.watch(host_id, url, customer_id, request)) as events:
                async for event in events:
                    await arrivals.put((host_id, event))
        except MetaldError as exc:
            await arrivals.put((host_id, exc))
            return
        await arrivals.put((host_id, None))
