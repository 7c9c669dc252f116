"""WatchVms in process: kept events after the cursor, then live ones; filters; only the caller's
VMs; exactly once across a daemon restart; an expired cursor is OUT_OF_RANGE."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.events import VmEvent, VmEventType
from metald.domain.states import VmState
from metald.usecases import WatchItem
from tests.service.conftest import CUSTOMER, World, open_world

T = VmEventType


def watch(
    world: World, cursor: str = "0", states: Sequence[VmState] = (), vm_ids: Sequence[str] = ()
) -> AsyncIterator[WatchItem]:
    return world.service.watch(CUSTOMER, states, vm_ids, cursor)


async def take(stream: AsyncIterator[WatchItem], n: int) -> list[WatchItem]:
    async def collect() -> list[WatchItem]:
        return [await anext(stream) for _ in range(n)]

    return await asyncio.wait_for(collect(), 2)


async def nothing_more(stream: AsyncIterator[WatchItem]) -> asyncio.Future[WatchItem]:
    """Asserts the stream waits; returns the pending next item (cancelling it would end the stream)."""
    following: asyncio.Future[WatchItem] = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.1)
    assert not following.done(), following.result()
    return following


async def test_kept_events_then_live_ones(world: World) -> None:
    await world.create("vm-a")
    await world.boot("vm-a")
    stream = watch(world)
    kept = await take(stream, 2)
    assert [(i.event.type, i.event.state) for i in kept] == [
        (T.CREATED, VmState.CREATED),
        (T.STATE_CHANGED, VmState.RUNNING),
    ]
    following = await nothing_more(stream)
    await world.service.pause(CUSTOMER, "vm-a")
    live = await asyncio.wait_for(following, 2)
    assert (live.event.type, live.event.state, live.event.previous_state) == (
        T.STATE_CHANGED,
        VmState.PAUSED,
        VmState.RUNNING,
    )
    assert int(live.cursor) > int(kept[-1].cursor)


async def test_no_cursor_means_from_now_on(world: World) -> None:
    await world.create("vm-a")
    stream = watch(world, cursor="")
    waiting = asyncio.ensure_future(take(stream, 1))
    await asyncio.sleep(0.05)
    await world.boot("vm-a")
    [item] = await waiting
    assert item.event.state is VmState.RUNNING


async def test_filters_and_customer_isolation(world: World) -> None:
    await world.create("vm-a")
    await world.create("vm-b")
    await world.create("vm-x", customer="other")
    await world.service.boot("other", "vm-x", wait_for_ready=False, wait_timeout=0)
    await world.boot("vm-a")
    await world.boot("vm-b")
    await world.service.shutdown(CUSTOMER, "vm-b", force=True, timeout_seconds=0)
    every = await take(watch(world), 5)
    assert {i.event.vm_id for i in every} == {"vm-a", "vm-b"}
    shut = watch(world, states=[VmState.SHUTDOWN])
    [item] = await take(shut, 1)
    assert (item.event.vm_id, item.event.state) == ("vm-b", VmState.SHUTDOWN)
    (await nothing_more(shut)).cancel()
    only_a = await take(watch(world, vm_ids=["vm-a"]), 2)
    assert {i.event.vm_id for i in only_a} == {"vm-a"}
    with pytest.raises(MetaldError) as exc:
        await anext(watch(world, states=[VmState.UNSPECIFIED]))
    assert exc.value.code is ErrorCode.INVALID_ARGUMENT


async def test_exactly_once_across_a_restart(world: World) -> None:
    await world.create("vm-a")
    await world.boot("vm-a")
    first = await take(watch(world), 2)
    cursor = first[-1].cursor
    await world.restart(host_reboot=True)  # recovery records the VMM gone
    await world.boot("vm-a")
    await world.service.delete(CUSTOMER, "vm-a", force=True)
    later = watch(world, cursor=cursor)
    items = await take(later, 3)
    assert [(i.event.type, i.event.state) for i in items] == [
        (T.EXITED, VmState.SHUTDOWN),
        (T.STATE_CHANGED, VmState.RUNNING),
        (T.DELETED, VmState.RUNNING),  # the state it was deleted in
    ]
    (await nothing_more(later)).cancel()
    seqs = [int(i.cursor) for i in first + items]
    assert seqs == sorted(set(seqs))


@pytest.mark.parametrize("cursor", ["abc", "-1", "99999999"])
async def test_a_cursor_that_is_not_ours_is_refused(world: World, cursor: str) -> None:
    await world.create("vm-a")
    with pytest.raises(MetaldError) as exc:
        await anext(watch(world, cursor=cursor))
    assert exc.value.code is ErrorCode.INVALID_ARGUMENT


async def test_many_watchers_each_get_every_event(world: World) -> None:
    await world.create("vm-a")
    streams = [watch(world, cursor="") for _ in range(20)]
    waiting = [asyncio.ensure_future(take(s, 3)) for s in streams]
    await asyncio.sleep(0.05)
    await world.boot("vm-a")
    await world.service.pause(CUSTOMER, "vm-a")
    await world.service.resume(CUSTOMER, "vm-a")
    for result in await asyncio.gather(*waiting):
        assert [i.event.state for i in result] == [VmState.RUNNING, VmState.PAUSED, VmState.RUNNING]


async def test_a_cursor_older_than_the_retention_is_out_of_range(world: World) -> None:
    w = await open_world(world.tmp / "short", retention=3)
    try:
        for i in range(4):
            await w.create(f"vm-{i}")
        await w.store.events.prune()
        with pytest.raises(MetaldError) as exc:
            await anext(watch(w, cursor="0"))  # event 1 was pruned
        assert (exc.value.code, exc.value.reason) == (ErrorCode.OUT_OF_RANGE, "CURSOR_EXPIRED")
        kept = await take(watch(w, cursor="1"), 3)  # the oldest cursor still good: nothing lost after it
        assert [i.event.vm_id for i in kept] == ["vm-1", "vm-2", "vm-3"]
    finally:
        await w.close()


async def test_watchers_of_one_customer_share_the_log_reads(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each wake-up reads the log once for all the customer's watches, not once per watch."""
    reads: list[int] = []
    read = world.store.events.events_after

    async def counted(customer_id: str, after_seq: int, limit: int) -> list[VmEvent]:
        reads.append(after_seq)
        return await read(customer_id, after_seq, limit)

    monkeypatch.setattr(world.store.events, "events_after", counted)
    await world.create("vm-a")
    streams = [watch(world, cursor="") for _ in range(50)]
    waiting = [asyncio.ensure_future(take(s, 3)) for s in streams]
    await asyncio.sleep(0.05)
    reads.clear()
    await world.boot("vm-a")
    await world.service.pause(CUSTOMER, "vm-a")
    await world.service.resume(CUSTOMER, "vm-a")
    for result in await asyncio.gather(*waiting):
        assert [i.event.state for i in result] == [VmState.RUNNING, VmState.PAUSED, VmState.RUNNING]
    assert 0 < len(reads) <= 6, reads  # one per notification at most (the old way: 150)


async def test_a_watch_behind_the_shared_window_reads_the_log_until_it_catches_up(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("metald.service.event_tail.TAIL_WINDOW", 3)
    for module in ("event_tail", "watch"):  # fewer than a batch means "caught up" to both
        monkeypatch.setattr(f"metald.service.{module}.WATCH_BATCH", 4)
    ahead = watch(world, cursor="")
    following = asyncio.ensure_future(take(ahead, 20))
    await asyncio.sleep(0.05)
    for i in range(20):  # the window moves past the first events
        await world.create(f"vm-{i:02d}")
    live = [i.event.vm_id for i in await following]
    assert live == [f"vm-{i:02d}" for i in range(20)]
    behind = watch(world, cursor="0")  # starts far behind the window, joins it, then live events
    caught_up = await take(behind, 20)
    assert [i.event.vm_id for i in caught_up] == live
    await world.boot("vm-07")
    [item] = await take(behind, 1)
    assert (item.event.vm_id, item.event.state) == ("vm-07", VmState.RUNNING)
    assert [int(i.cursor) for i in [*caught_up, item]] == sorted({int(i.cursor) for i in [*caught_up, item]})


async def test_the_shared_tail_goes_with_the_customers_last_watch(world: World) -> None:
    await world.create("vm-a")
    streams = [watch(world) for _ in range(2)]
    for stream in streams:
        await take(stream, 1)
    assert CUSTOMER in world.service._tails
    await streams[0].aclose()  # type: ignore[attr-defined]
    assert CUSTOMER in world.service._tails
    await streams[1].aclose()  # type: ignore[attr-defined]
    assert CUSTOMER not in world.service._tails
