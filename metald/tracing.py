"""OpenTelemetry tracing: off unless the standard OTEL_* variables ask for it.

On when OTEL_TRACES_EXPORTER names an exporter (`otlp`, `console`; `none` is off) or an OTLP
endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT); off when
OTEL_SDK_DISABLED=true. The exporters, sampler (OTEL_TRACES_SAMPLER), batching (OTEL_BSP_*) and
resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES) read their own variables.

Each RPC (a server stream too, for as long as it streams) gets one SERVER span (W3C `traceparent` from the caller is honoured) named
`vmprovisioner.v1.VmService/<Method>`, with the RPC, customer id, VM id and code as attributes;
calls into the store, the backend and the network made during it are its child spans.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextvars import Token
from typing import Any, TypeVar, cast

from connectrpc.interceptor import Interceptor
from connectrpc.request import RequestContext
from opentelemetry import context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from metald import __version__
from metald.api.auth import ConfigError
from metald.api.interceptor import current_customer, result_code

T = TypeVar("T")
Ctx = RequestContext[Any, Any]
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise ConfigError(f"OTEL_TRACES_EXPORTER={name}: supported are otlp, console, none")
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol != "http/protobuf":
        raise ConfigError(f"OTLP protocol {protocol}: only http/protobuf is supported")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def provider_from_env(env: Mapping[str, str]) -> TracerProvider | None:
    """A provider exporting as the environment says, or None when tracing is off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = env.get("OTEL_TRACES_EXPORTER", "")
    if not names and any(env.get(v) for v in _ENDPOINT_VARS):
        names = "otlp"
    exporters = [n.strip() for n in names.split(",") if n.strip() not in ("", "none")]
    if not exporters:
        return None
    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "metald"}))
    provider = TracerProvider(resource=resource)
    for name in exporters:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    return provider


class RpcSpans:
    """A leading metadata interceptor: the RPC's span is current from before authentication
    until the response, so everything the handler awaits is inside it."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    async def on_start(self, ctx: Ctx) -> tuple[trace.Span, Token[Context]]:
        method = ctx.method
        span = self._tracer.start_span(
            f"{method.service_name}/{method.name}",
            context=propagate.extract(dict(ctx.request_headers.items())),
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "connect_rpc",
                "rpc.service": method.service_name,
                "rpc.method": method.name,
            },
        )
        return span, context.attach(trace.set_span_in_context(span))

    async def on_end(
        self, token: tuple[trace.Span, Token[Context]], ctx: Ctx, error: Exception | None, /
    ) -> None:
        span, attached = token
        code = result_code(error)
        span.set_attribute("metald.code", code)
        if customer := current_customer.get(""):
            span.set_attribute("metald.customer_id", customer)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, f"{code}: {error}"))
        span.end()
        context.detach(attached)


class VmIdOnSpan:
    """Innermost interceptor: names the VM on the RPC's span (for CreateVm without a vm_id, the
    id the daemon chose). A server stream's span lasts the whole stream (RpcSpans ends it after
    the last message); this adds the VMs it watches and, at its end, how many messages it sent."""

    async def intercept_unary(self, call_next: Callable[[Any, Ctx], Any], request: Any, ctx: Ctx, /) -> Any:
        span = trace.get_current_span()
        if vm_id := getattr(request, "vm_id", ""):
            span.set_attribute("metald.vm_id", vm_id)
        response = await call_next(request, ctx)
        if not vm_id and (vm_id := getattr(response, "vm_id", "")):
            span.set_attribute("metald.vm_id", vm_id)
        return response

    async def intercept_server_stream(
        self, call_next: Callable[[Any, Ctx], AsyncIterator[Any]], request: Any, ctx: Ctx, /
    ) -> AsyncIterator[Any]:
        span = trace.get_current_span()
        span.set_attribute("rpc.server_streaming", True)
        if vm_ids := list(getattr(request, "vm_ids", ())):
            span.set_attribute("metald.vm_ids", vm_ids)
        sent = 0
        responses = call_next(request, ctx)
        try:
            async for response in responses:
                sent += 1
                yield response
        finally:
            span.set_attribute("metald.stream.messages_sent", sent)
            if (aclose := getattr(responses, "aclose", None)) is not None:
                await aclose()  # a generator wrapping another does not close it by itself


class _TracedPort:
    """Forwards everything to `target`; its coroutine methods become child spans
    `<component>.<method>` when called inside a recording span (an RPC)."""

    def __init__(self, target: object, component: str, tracer: Tracer) -> None:
        self._target = target
        self._component = component
        self._tracer = tracer

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not inspect.iscoroutinefunction(value):
            return value
        span_name = f"{self._component}.{name}"
        tracer = self._tracer

        @functools.wraps(value)
        async def call(*args: Any, **kwargs: Any) -> Any:
            if not trace.get_current_span().is_recording():
                return await value(*args, **kwargs)
            with tracer.start_as_current_span(span_name, attributes={"metald.component": self._component}):
                return await value(*args, **kwargs)

        return call


class Tracing:
    """What the composition root needs; every method is the identity when tracing is off."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("metald", __version__) if provider else None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Tracing:
        return cls(provider_from_env(env))

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def port(self, target: T, component: str) -> T:
        """`target` (a store, backend or network) with its async calls traced."""
        if self._tracer is None or target is None:
            return target
        return cast(T, _TracedPort(target, component, self._tracer))

    def around(self, interceptors: Sequence[Interceptor]) -> list[Interceptor]:
        """The RPC interceptors with the span opened first and the VM id tagged last."""
        if self._tracer is None:
            return list(interceptors)
        return [RpcSpans(self._tracer), *interceptors, VmIdOnSpan()]

    async def shutdown(self) -> None:
        """Flush what is buffered (the exporters block, hence the thread)."""
        if self._provider is not None:
            await asyncio.to_thread(self._provider.shutdown)
