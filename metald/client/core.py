"""The one core of the sync and async clients, so the two cannot drift.

Every method of the SDK is declared once, in VmServiceMethods, from a builder in
metald.client.calls; the `unary` descriptor binds it to the client's own `_unary` (which returns
the response in metald.client.sync.Client, an awaitable of it in metald.client.aio.AsyncClient).
What the conveniences decide (retries, paging, waiting, resuming a watch) lives here as small
state objects; the clients keep only the transport glue: send, sleep, iterate.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Generic, ParamSpec, Protocol, Self, TypedDict, TypeVar, overload

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from metald.client import calls, common
from metald.client.calls import Call, RpcCall
from metald.client.common import NO_RETRY, Options, RetryPolicy, StateLike
from metald.client.errors import ApiError, from_connect
from metald.gen.vmprovisioner.v1 import vm_pb as pb

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
# A broken watch (the daemon restarting, a dropped connection) that `reconnect` resumes.
RESUMABLE = frozenset({Code.UNAVAILABLE, Code.UNKNOWN, Code.CANCELED})


class unary(Generic[P, R]):
    """A client method from a builder: the builder's signature and docstring, and the result of
    the client's `_unary` (a response, or an awaitable of one)."""

    def __init__(self, build: Callable[P, Call[R]]) -> None:
        self.build = build
        self.__doc__ = build.__doc__

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Self: ...

    @overload
    def __get__(self, obj: SyncCore, owner: type[Any]) -> Callable[P, R]: ...

    @overload
    def __get__(self, obj: AsyncCore, owner: type[Any]) -> Callable[P, Awaitable[R]]: ...

    def __get__(self, obj: SyncCore | AsyncCore | None, owner: type[Any]) -> Any:
        if obj is None:
            return self
        build, run = self.build, obj._unary

        @functools.wraps(build)
        def method(*args: P.args, **kwargs: P.kwargs) -> Any:
            return run(build(*args, **kwargs))

        return method


class VmServiceMethods:
    """Every RPC of vmprovisioner.v1.VmService but the WatchVms stream (each client's
    `watch_vms`), and the console and /health endpoints."""

    create_vm = unary(calls.create_vm)
    boot_vm = unary(calls.boot_vm)
    shutdown_vm = unary(calls.shutdown_vm)
    pause_vm = unary(calls.pause_vm)
    resume_vm = unary(calls.resume_vm)
    reboot_vm = unary(calls.reboot_vm)
    delete_vm = unary(calls.delete_vm)
    get_vm_info = unary(calls.get_vm_info)
    list_vms = unary(calls.list_vms)
    snapshot_vm = unary(calls.snapshot_vm)
    list_snapshots = unary(calls.list_snapshots)
    delete_snapshot = unary(calls.delete_snapshot)
    exec_vm = unary(calls.exec_vm)
    write_file = unary(calls.write_file)
    read_file = unary(calls.read_file)
    console = unary(calls.console)
    health = unary(calls.health)


class ClientBase(VmServiceMethods, abc.ABC):
    """VmService over Connect (default), gRPC or gRPC-Web, plus the console and health endpoints;
    url and token default to $METALD_URL and $METALD_TOKEN."""

    def __init__(
        self,
        url: str = "",
        token: str = "",
        *,
        timeout: float = 60.0,
        protocol: str = "connect",
        retry: RetryPolicy | None = None,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        self.options = Options(
            url, token, timeout, protocol, retry or RetryPolicy(), tls_ca, tls_cert, tls_key
        ).resolved()
        self._open()

    @abc.abstractmethod
    def _open(self) -> None:
        """Set up the transport from self.options."""


class SyncCore(ClientBase):
    @abc.abstractmethod
    def _unary(self, call: Call[R]) -> R: ...


class AsyncCore(ClientBase):
    @abc.abstractmethod
    async def _unary(self, call: Call[R]) -> R: ...


class Attempts:
    """One unary call's attempts: its deadline, and after each failure whether to retry (the
    pause) or give up (the ApiError raised)."""

    def __init__(self, call: RpcCall[Any], options: Options) -> None:
        policy = options.retry if call.rpc.retried else NO_RETRY
        self._retry_on = policy.retry_on
        self._delays = policy.delays()
        self.timeout_ms = int(max(options.timeout, call.min_timeout) * 1000)

    def delay_after(self, error: ConnectError) -> float:
        delay = next(self._delays, None) if error.code in self._retry_on else None
        if delay is None:
            raise from_connect(error) from None
        return delay


class _Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


Page = TypeVar("Page", bound=_Page)


class Pages(Generic[Page, T]):
    """Walks a keyset listing: `next()` is the next page's call (None after the last page)."""

    def __init__(self, request: Callable[[str], Call[Page]], items: Callable[[Page], Iterable[T]]) -> None:
        self._request = request
        self._items = items
        self._token: str | None = ""

    def next(self) -> Call[Page] | None:
        return None if self._token is None else self._request(self._token)

    def items(self, page: Page) -> Iterable[T]:
        self._token = page.next_page_token or None
        return self._items(page)


def vm_pages(states: Iterable[StateLike], page_size: int) -> Pages[pb.ListVmsResponse, pb.VmInfo]:
    wanted = list(states)
    return Pages(
        lambda token: calls.list_vms(states=wanted, page_size=page_size, page_token=token),
        lambda page: page.vms,
    )


def snapshot_pages(page_size: int) -> Pages[pb.ListSnapshotsResponse, pb.Snapshot]:
    return Pages(
        lambda token: calls.list_snapshots(page_size=page_size, page_token=token),
        lambda page: page.snapshots,
    )


class StateWait:
    """wait_for_state's decisions: reached, keep polling, or TimeoutError naming the last state."""

    def __init__(self, vm_id: str, state: StateLike, timeout: float) -> None:
        self.vm_id = vm_id
        self.wanted = common.state(state)
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.info = pb.GetVmInfoResponse()

    def reached(self, info: pb.GetVmInfoResponse) -> bool:
        self.info = info
        if info.state == self.wanted:
            return True
        if time.monotonic() >= self.deadline:
            raise TimeoutError(
                f"{self.vm_id} is {common.state_name(info.state)} after {self.timeout:g}s, "
                f"not {common.state_name(self.wanted)}"
            )
        return False


# Told before a watch is opened again: what broke it (None: the server ended it), the cursor it
# resumes after, and the pause before it does.
OnReconnect = Callable[[ApiError | None, str, float], None]


class WatchOptions(TypedDict, total=False):
    """watch_vms' options, for both clients: the caller's VM events after `after_cursor` (empty:
    live ones only), until the stream ends; with `reconnect`, resumed from the last event's cursor
    whenever it breaks (and `on_reconnect(error, cursor, pause)` told each time)."""

    states: Iterable[StateLike]
    vm_ids: Iterable[str]
    after_cursor: str
    reconnect: bool
    on_reconnect: OnReconnect | None


@dataclasses.dataclass
class Watch:
    """A WatchVms that follows its cursor. Each `next()` is (pause, call) for the next stream to
    open, or None when done. With `reconnect`, a stream that breaks (RESUMABLE codes, or the
    server ending it) is opened again after the last event seen, so every event arrives exactly
    once; the pause backs off by the retry policy and resets with each event. Anything else
    (CURSOR_EXPIRED, a denied filter) is raised."""

    states: list[pb.VmState]
    vm_ids: list[str]
    cursor: str
    reconnect: bool
    retry: RetryPolicy
    on_reconnect: OnReconnect | None = None
    _opened: bool = False
    _error: ApiError | None = None
    _delays: Iterator[float] = dataclasses.field(default_factory=lambda: iter(()))

    @classmethod
    def of(
        cls,
        states: Iterable[StateLike] = (),
        vm_ids: Iterable[str] = (),
        after_cursor: str = "",
        reconnect: bool = False,
        retry: RetryPolicy = NO_RETRY,
        on_reconnect: OnReconnect | None = None,
    ) -> Watch:
        watch = cls(
            [common.state(s) for s in states], list(vm_ids), after_cursor, reconnect, retry, on_reconnect
        )
        watch._reset()
        return watch

    def _reset(self) -> None:
        self._delays = dataclasses.replace(self.retry, attempts=sys.maxsize).delays()

    def next(self) -> tuple[float, RpcCall[pb.VmEvent]] | None:
        delay = 0.0
        if self._opened:
            error, self._error = self._error, None
            if error is not None and (not self.reconnect or error.code not in RESUMABLE):
                raise error
            if not self.reconnect:
                return None
            delay = next(self._delays)
            if self.on_reconnect is not None:
                self.on_reconnect(error, self.cursor, delay)
        self._opened = True
        return delay, calls.watch_vms(states=self.states, vm_ids=self.vm_ids, after_cursor=self.cursor)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around one stream: its ApiError is kept for `next()` to decide on."""
        try:
            yield
        except ApiError as exc:
            self._error = exc

    def seen(self, event: pb.VmEvent) -> pb.VmEvent:
        self.cursor = event.cursor
        self._reset()
        return event
