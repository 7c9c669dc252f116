"""Around every RPC: authenticate, log, count, and map domain errors to Connect errors once."""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from metald.api.auth import Authenticator
from metald.api.errors import to_connect_error
from metald.api.metrics import Metrics
from metald.domain.errors import MetaldError

log = logging.getLogger("metald.rpc")

current_customer: contextvars.ContextVar[str] = contextvars.ContextVar("current_customer")
# Per-connection facts the ASGI layer learned (e.g. the TLS client certificate), for auth.
current_peer: contextvars.ContextVar[dict[str, object]] = contextvars.ContextVar("current_peer")


class RpcInterceptor:
    def __init__(self, authenticator: Authenticator, metrics: Metrics) -> None:
        self._auth = authenticator
        self._metrics = metrics

    async def intercept_unary(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]],
        request: Any,
        ctx: RequestContext[Any, Any],
        /,
    ) -> Any:
        rpc = ctx.method.name
        request_id = ctx.request_headers.get("x-request-id") or uuid.uuid4().hex[:16]
        ctx.response_headers["x-request-id"] = request_id
        started = time.monotonic()
        customer = ""
        code = "ok"
        try:
            customer = self._auth.authenticate(ctx.request_headers, current_peer.get({}))
            token = current_customer.set(customer)
            try:
                return await call_next(request, ctx)
            finally:
                current_customer.reset(token)
        except MetaldError as exc:
            code = exc.code.value
            raise to_connect_error(exc) from None
        except ConnectError as exc:
            code = exc.code.name.lower()
            raise
        except Exception as exc:
            code = "internal"
            log.exception("unexpected error in %s", rpc)
            raise ConnectError(Code.INTERNAL, "internal error") from exc
        finally:
            seconds = time.monotonic() - started
            self._metrics.rpc_finished(rpc, code, seconds)
            log.info(
                "rpc %s %s",
                rpc,
                code,
                extra={
                    "request_id": request_id,
                    "rpc": rpc,
                    "customer_id": customer,
                    "vm_id": getattr(request, "vm_id", "") or "",
                    "code": code,
                    "duration_ms": round(seconds * 1000, 2),
                },
            )
