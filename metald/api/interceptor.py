"""Around every RPC: authenticate before the body is read, map domain errors to Connect errors
once, and log and count each call with its outcome."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from metald.api.auth import Authenticator, current_peer
from metald.api.errors import to_connect_error
from metald.api.metrics import Metrics
from metald.domain.errors import MetaldError
from metald.logs import has_secret

log = logging.getLogger("metald.rpc")

current_customer: contextvars.ContextVar[str] = contextvars.ContextVar("current_customer")
_current_vm: contextvars.ContextVar[str] = contextvars.ContextVar("current_vm", default="")


@dataclass
class CallStart:
    started: float
    request_id: str
    customer: str


class AuthInterceptor:
    """A leading metadata interceptor: runs before the request body is read or parsed, so an
    unauthenticated caller always gets UNAUTHENTICATED, whatever its body."""

    def __init__(self, authenticator: Authenticator, metrics: Metrics) -> None:
        self._auth = authenticator
        self._metrics = metrics

    async def on_start(self, ctx: RequestContext[Any, Any]) -> CallStart:
        request_id = request_id_for(ctx.request_headers.get("x-request-id", ""))
        ctx.response_headers["x-request-id"] = request_id
        start = CallStart(time.monotonic(), request_id, "")
        try:
            start.customer = self._auth.authenticate(ctx.request_headers, current_peer.get())
        except MetaldError as exc:
            self._finish(start, ctx, exc.code.value)
            raise to_connect_error(exc) from None
        current_customer.set(start.customer)
        return start

    async def on_end(
        self, token: CallStart, ctx: RequestContext[Any, Any], error: Exception | None, /
    ) -> None:
        self._finish(token, ctx, result_code(error))

    def _finish(self, start: CallStart, ctx: RequestContext[Any, Any], code: str) -> None:
        record_call(
            self._metrics,
            ctx.method.name,
            code,
            time.monotonic() - start.started,
            request_id=start.request_id,
            customer=start.customer,
            vm_id=_current_vm.get(),
        )


def record_call(
    metrics: Metrics, rpc: str, code: str, seconds: float, *, request_id: str, customer: str, vm_id: str
) -> None:
    """A finished call's metrics and its `rpc` log line (also written by the gateway's fast path)."""
    metrics.rpc_finished(rpc, code, seconds)
    log.info(
        "rpc %s %s",
        rpc,
        code,
        extra={
            "request_id": request_id,
            "rpc": rpc,
            "customer_id": customer,
            "vm_id": vm_id,
            "code": code,
            "duration_ms": round(seconds * 1000, 2),
        },
    )


def result_code(error: Exception | None) -> str:
    """A finished call's code as logged, counted and put on its span: "ok", the Connect code's
    name in lower case, or "internal" for anything else."""
    if error is None:
        return "ok"
    return error.code.name.lower() if isinstance(error, ConnectError) else "internal"


def request_id_for(given: str) -> str:
    """The caller's x-request-id (at most 64 characters), unless it is empty or carries a
    credential (then a fresh one, 64 random bits in hex: a token must not reach the logs or come
    back in a header)."""
    given = given[:64]
    return given if given and not has_secret(given) else os.urandom(8).hex()


class ErrorInterceptor:
    """Domain errors become Connect errors here, and only here; anything unexpected is INTERNAL.
    Unary calls and server streams (WatchVms) alike."""

    async def intercept_unary(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]],
        request: Any,
        ctx: RequestContext[Any, Any],
        /,
    ) -> Any:
        _current_vm.set(getattr(request, "vm_id", "") or "")
        with _mapped(ctx):
            return await call_next(request, ctx)

    async def intercept_server_stream(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], AsyncIterator[Any]],
        request: Any,
        ctx: RequestContext[Any, Any],
        /,
    ) -> AsyncIterator[Any]:
        with _mapped(ctx):
            async for response in call_next(request, ctx):
                yield response


@contextlib.contextmanager
def _mapped(ctx: RequestContext[Any, Any]) -> Iterator[None]:
    try:
        yield
    except MetaldError as exc:
        raise to_connect_error(exc) from None
    except ConnectError:
        raise
    except Exception as exc:
        log.exception("unexpected error in %s", ctx.method.name)
        raise ConnectError(Code.INTERNAL, "internal error") from exc
