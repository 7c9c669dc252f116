"""WatchVms through the SDK against a running daemon: the sync iterator (kept events, resuming
after a cursor, filters, live events) and the async one, resumed across a daemon kill -9 with
`reconnect`, every event exactly once; without `reconnect` the break is an UnavailableError."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from metald.client import ApiError, AsyncClient, Client, InvalidArgumentError, UnavailableError
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from tests.ops.conftest import StartDaemon
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc, token

CREATED, DELETED = pb.VmEventType.CREATED, pb.VmEventType.DELETED


class Taker:
    """Reads a blocking event iterator on a thread, so a test can wait for each with a timeout."""

    def __init__(self, events: Iterator[pb.VmEvent]) -> None:
        self.events = events
        self.box: queue.Queue[pb.VmEvent | BaseException] = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for event in self.events:
                self.box.put(event)
        except BaseException as exc:
            self.box.put(exc)

    def take(self, n: int, timeout: float = 20) -> list[pb.VmEvent]:
        found = []
        for _ in range(n):
            item = self.box.get(timeout=timeout)
            if isinstance(item, BaseException):
                raise item
            found.append(item)
        return found


def test_sync_watch_replays_resumes_filters_and_follows(daemon: Daemon, rpc: Rpc, customer: str) -> None:
    with Client(daemon.url, token(customer)) as client:
        first = client.create_vm().vm_id
        second = client.create_vm().vm_id
        client.delete_vm(first)
        kept = Taker(client.watch_vms(after_cursor="0")).take(3)
        assert [(e.vm_id, e.type) for e in kept] == [(first, CREATED), (second, CREATED), (first, DELETED)]
        assert kept[0].state == pb.VmState.CREATED and kept[2].reason == "deleted"

        resumed = Taker(client.watch_vms(after_cursor=kept[0].cursor)).take(2)
        assert [e.cursor for e in resumed] == [e.cursor for e in kept[1:]]  # exactly the later ones
        only = Taker(client.watch_vms(after_cursor="0", vm_ids=[second], states=["created"])).take(1)
        assert [(e.vm_id, e.type) for e in only] == [(second, CREATED)]

        live = Taker(client.watch_vms(vm_ids=[second]))
        time.sleep(1.0)  # the stream is open before the VM is made
        client.create_vm()  # another VM: filtered out
        client.delete_vm(second)
        assert [(e.vm_id, e.type) for e in live.take(1)] == [(second, DELETED)]

        with pytest.raises(InvalidArgumentError) as refused:
            next(client.watch_vms(after_cursor="not-a-cursor"))
        assert refused.value.metadata["field"] == "after_cursor"


async def _next(events: AsyncIterator[pb.VmEvent], timeout: float = 30) -> pb.VmEvent:
    return await asyncio.wait_for(anext(events), timeout)


async def test_async_watch_reconnects_across_a_daemon_kill(start_daemon: StartDaemon) -> None:
    daemon = start_daemon("watchkill")
    async with AsyncClient(daemon.url, "dev_customer_watcher", protocol="grpc") as client:
        before = (await client.create_vm(vm_id="before-kill")).vm_id
        events = client.watch_vms(after_cursor="0", reconnect=True)
        plain = client.watch_vms(after_cursor="0")  # the same, without reconnect
        first = await _next(events)
        assert (first.vm_id, first.type) == (before, CREATED)
        assert (await _next(plain)).cursor == first.cursor

        await asyncio.to_thread(daemon.kill9)
        with pytest.raises(UnavailableError):
            await _next(plain)
        await asyncio.to_thread(daemon.start)
        after = (await client.create_vm(vm_id="after-kill")).vm_id
        await client.delete_vm(before)
        resumed = [await _next(events), await _next(events)]
        assert [(e.vm_id, e.type) for e in resumed] == [(after, CREATED), (before, DELETED)]
        assert int(first.cursor) < int(resumed[0].cursor) < int(resumed[1].cursor)  # once each, in order
        await events.aclose()

        with pytest.raises(ApiError) as expired:  # a cursor from the future is never resumed
            await _next(client.watch_vms(after_cursor="999999", reconnect=True))
        assert expired.value.code.value == "invalid_argument"
