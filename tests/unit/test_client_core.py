"""The SDK's one core: the RPC table against the service's own descriptor, both clients with the
same methods and signatures, and the decisions of retries, paging and a resumed watch."""

from __future__ import annotations

import asyncio
import inspect
import itertools

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, StreamType

from metald.client import ApiError, AsyncClient, Client, RetryPolicy, UnavailableError, calls, core, rpcs
from metald.client.common import Options
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.gen.vmprovisioner.v1.vm_connect import VmService


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def test_the_table_is_the_service() -> None:
    methods = {m.name: m for m in VmService.desc().methods}
    table = {rpc.method.name: rpc for rpc in rpcs.ALL}
    assert table.keys() == methods.keys()  # every RPC, none invented
    for name, rpc in table.items():
        described = methods[name]
        assert rpc.method.service_name == rpcs.SERVICE == VmService.desc().type_name
        assert rpc.method.input.__name__ == described.input.name
        assert rpc.method.output.__name__ == described.output.name
        assert rpc.streaming == (described.method_kind == "server_streaming")
        assert rpc.method.stream_type is (StreamType.SERVER_STREAM if rpc.streaming else StreamType.UNARY)
        declared_read = str(described.idempotency) == "NO_SIDE_EFFECTS"
        assert (rpc.method.idempotency_level is IdempotencyLevel.NO_SIDE_EFFECTS) == declared_read
        assert rpc.retried == (declared_read or name == "ReadFile")  # reads only, never a write
        assert not (rpc.retried and rpc.streaming)


def test_every_rpc_is_a_method_of_both_clients_with_one_signature() -> None:
    sync_client, async_client = Client("http://127.0.0.1:1"), AsyncClient("http://127.0.0.1:1")
    try:
        for rpc in rpcs.ALL:
            name = _snake(rpc.method.name)
            assert hasattr(calls, name), name
            assert callable(getattr(sync_client, name)) and callable(getattr(async_client, name)), name
        public = {n for n in dir(Client) if not n.startswith("_")}
        assert public == {n for n in dir(AsyncClient) if not n.startswith("_")}
        for name in sorted(public - {"options"}):
            sync_method, async_method = getattr(sync_client, name), getattr(async_client, name)
            assert inspect.signature(sync_method).parameters == inspect.signature(async_method).parameters, (
                name
            )
            assert (sync_method.__doc__ or "") == (async_method.__doc__ or ""), name
            assert (
                inspect.iscoroutinefunction(async_method)
                or inspect.isasyncgenfunction(async_method)
                or (isinstance(inspect.getattr_static(AsyncClient, name), core.unary))
            ), name
    finally:
        sync_client.close()
        asyncio.run(async_client.close())


def test_calls_build_the_requests() -> None:
    clone = calls.create_vm({"metadata": {"k": "v"}}, vm_id="c1", snapshot_id="snap_a")
    assert isinstance(clone, calls.RpcCall) and clone.rpc is rpcs.CREATE_VM
    assert clone.request == pb.CreateVmRequest(
        vm_id="c1", snapshot_id="snap_a", config=pb.VmConfig(metadata={"k": "v"})
    )
    snap = calls.snapshot_vm("vm1", snapshot_id="s", metadata={"a": "b"}, warm_pool_size=2)
    assert isinstance(snap, calls.RpcCall) and snap.rpc is rpcs.SNAPSHOT_VM
    assert snap.request == pb.SnapshotVmRequest(
        vm_id="vm1", snapshot_id="s", metadata={"a": "b"}, warm_pool_size=2
    )
    watch = calls.watch_vms(states=["running"], vm_ids=["a"], after_cursor="7")
    assert watch.request == pb.WatchVmsRequest(
        state_filter=[pb.VmState.RUNNING], vm_ids=["a"], after_cursor="7"
    )
    boot = calls.boot_vm("vm1", wait_for_ready=True, wait_timeout_seconds=100)
    assert isinstance(boot, calls.RpcCall) and boot.min_timeout == 130  # the server's wait + slack
    assert isinstance(calls.console("a/b", 5, 10), calls.HttpGet)
    assert calls.console("a/b", 5, 10).path == "/v1/vms/a%2Fb/console?offset=5&limit=10"  # type: ignore[union-attr]


def test_attempts_retry_reads_only_on_retryable_codes() -> None:
    options = Options(url="http://x", retry=RetryPolicy(attempts=3, initial_backoff=0.01)).resolved()
    read = core.Attempts(calls.get_vm_info("a"), options)  # type: ignore[arg-type]
    assert read.timeout_ms == 60_000
    assert 0 <= read.delay_after(ConnectError(Code.UNAVAILABLE, "x")) <= 0.01
    read.delay_after(ConnectError(Code.UNAVAILABLE, "x"))
    with pytest.raises(UnavailableError):  # out of attempts
        read.delay_after(ConnectError(Code.UNAVAILABLE, "x"))
    with pytest.raises(ApiError) as not_retried:
        core.Attempts(calls.get_vm_info("a"), options).delay_after(ConnectError(Code.NOT_FOUND, "gone"))  # type: ignore[arg-type]
    assert not_retried.value.code is Code.NOT_FOUND
    write = core.Attempts(calls.create_vm(), options)  # type: ignore[arg-type]
    with pytest.raises(UnavailableError):
        write.delay_after(ConnectError(Code.UNAVAILABLE, "x"))


def test_pages_follow_the_token() -> None:
    pages = core.vm_pages(["running"], 2)
    first = pages.next()
    assert (
        isinstance(first, calls.RpcCall) and first.request.page_token == "" and first.request.page_size == 2
    )
    assert [
        v.vm_id for v in pages.items(pb.ListVmsResponse(vms=[pb.VmInfo(vm_id="a")], next_page_token="t"))
    ] == ["a"]
    second = pages.next()
    assert isinstance(second, calls.RpcCall) and second.request.page_token == "t"
    assert list(pages.items(pb.ListVmsResponse())) == []
    assert pages.next() is None


FAST = RetryPolicy(initial_backoff=0.5, max_backoff=1.0)


def test_a_watch_without_reconnect_opens_once() -> None:
    watch = core.Watch.of([], [], "", False, FAST)
    step = watch.next()
    assert step is not None and step[0] == 0 and step[1].request.after_cursor == ""
    with watch.guard():
        watch.seen(pb.VmEvent(cursor="4"))
    assert watch.next() is None  # the stream ended: done
    broken = core.Watch.of([], [], "", False, FAST)
    broken.next()
    with broken.guard():
        raise UnavailableError(Code.UNAVAILABLE, "reset")
    with pytest.raises(UnavailableError):
        broken.next()


def test_a_reconnecting_watch_resumes_after_the_last_cursor_and_backs_off() -> None:
    told: list[tuple[ApiError | None, str, float]] = []
    watch = core.Watch.of(["running"], ["a"], "2", True, FAST, lambda *a: told.append(a))
    assert watch.next()[1].request.after_cursor == "2"  # type: ignore[index]
    delays: list[float] = []
    for cursor in ("5", None, None):
        with watch.guard():
            if cursor:
                watch.seen(pb.VmEvent(cursor=cursor))
            raise UnavailableError(Code.UNAVAILABLE, "daemon restarting")
        step = watch.next()
        assert step is not None
        delays.append(step[0])
        assert step[1].request == pb.WatchVmsRequest(
            state_filter=[pb.VmState.RUNNING], vm_ids=["a"], after_cursor="5"
        )
    assert all(0 <= d <= 1.0 for d in delays)
    assert [(e.code if e else None, c, d) for e, c, d in told] == [(Code.UNAVAILABLE, "5", d) for d in delays]
    assert watch.next() is not None  # a stream the server ended is resumed too
    assert told[-1][:2] == (None, "5")
    with watch.guard():
        raise ApiError(Code.OUT_OF_RANGE, "cursor expired")
    with pytest.raises(ApiError) as expired:
        watch.next()  # not resumable: the caller must re-list
    assert expired.value.code is Code.OUT_OF_RANGE


def test_the_reconnect_backoff_never_runs_out() -> None:
    watch = core.Watch.of([], [], "", True, RetryPolicy(attempts=2, initial_backoff=0.001, max_backoff=0.002))
    watch.next()
    steps = list(itertools.islice(iter(watch.next, None), 50))
    assert len(steps) == 50 and all(s[0] <= 0.002 for s in steps)
