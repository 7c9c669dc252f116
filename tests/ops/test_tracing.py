"""OpenTelemetry: off by default, on with the standard OTEL_* variables; one SERVER span per RPC
with the store's and the backend's work as child spans.

Proved twice: in-process (the service layer over the real SqliteStore, an in-memory exporter),
and end to end (a daemon exporting OTLP/HTTP to a collector this test runs on loopback).
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from metald.api.metrics import Metrics
from metald.assets import AssetResolver
from metald.client import Client
from metald.domain.model import VmConfig
from metald.domain.paging import PageTokens
from metald.domain.quotas import Quotas
from metald.domain.validation import Defaults, Limits
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.ports import BackendCapabilities, CheckResult, LaunchSpec
from metald.service import ServiceOptions, ServicePorts, VmService
from metald.store.sqlite import SqliteStore
from metald.tracing import Tracing, provider_from_env
from tests.ops.conftest import StartDaemon
from tests.ops.support import eventually
from tests.support.rpc import Rpc


@pytest.mark.parametrize(
    ("env", "enabled"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_off_unless_the_environment_asks(env: dict[str, str], enabled: bool) -> None:
    provider = provider_from_env(env)
    assert (provider is not None) == enabled
    if provider is not None:
        provider.shutdown()


class FakeBackend:
    """Just enough of a backend for CreateVm/DeleteVm; the store is the real one."""

    capabilities = BackendCapabilities("fake", {}, frozenset({"SERIAL", "VIRTIO_CONSOLE"}))

    def set_exit_listener(self, listener: Any) -> None: ...

    async def prepare(self, spec: LaunchSpec) -> None: ...

    async def destroy(self, vm_id: str, vm_dir: Path) -> None: ...

    def last_exit_reason(self, vm_id: str) -> str | None:
        return None

    async def ping(self) -> CheckResult:
        return CheckResult("healthy")


async def test_service_work_becomes_child_spans(tmp_path: Path, assets_dir: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    store = await SqliteStore.open(tmp_path / "metald.db")
    try:
        service = VmService(
            ports=ServicePorts(
                store=tracing.port(store.vms, "store"),
                event_log=store.events,
                backend=tracing.port(FakeBackend(), "backend"),  # type: ignore[arg-type]
                network=None,
                assets=AssetResolver(assets_dir),
                page_tokens=PageTokens(b"k" * 32),
                events=Metrics(),
                options=ServiceOptions(tmp_path / "vms", Limits(), Defaults(), Quotas(), 30, 60),
            )
        )
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("rpc") as rpc_span:
            await service.create("c1", "traced-vm", VmConfig(), "")
        await service.info("c1", "traced-vm")  # outside any span: no spans at all
    finally:
        await store.close()
    spans = exporter.get_finished_spans()
    children = [s for s in spans if s.parent is not None]
    assert {s.name for s in children} >= {"store.get", "store.insert", "backend.prepare", "store.save"}
    assert all(s.parent.span_id == rpc_span.get_span_context().span_id for s in children)  # type: ignore[union-attr]
    assert all(s.attributes["metald.component"] in ("store", "backend") for s in children)  # type: ignore[index]
    assert len(spans) == len(children) + 1


class Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: keeps every span posted to /v1/traces."""

    spans: list[Any] = []
    resources: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            Collector.resources.append(attrs)
            for scope in resource_spans.scope_spans:
                Collector.spans.extend(scope.spans)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None: ...


@pytest.fixture
def collector() -> Iterator[str]:
    Collector.spans, Collector.resources = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _attrs(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in span.attributes:
        out[a.key] = a.value.string_value or a.value.int_value
    return out


def test_daemon_exports_rpc_spans_over_otlp(start_daemon: StartDaemon, collector: str) -> None:
    daemon = start_daemon(
        "otel",
        env={
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_SERVICE_NAME": "metald-under-test",
        },
    )
    rpc = Rpc(daemon.url, "tracer")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    created = rpc.client.post(
        "/vmprovisioner.v1.VmService/CreateVm",
        json={"config": {}},
        headers={
            "Authorization": "Bearer dev_customer_tracer",
            "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
        },
    )
    assert created.status_code == 200
    vm_id = created.json()["vm_id"]
    rpc.error("GetVmInfo", {"vm_id": "missing-vm"})
    assert httpx.get(
        f"{daemon.url}/v1/vms/{vm_id}", headers={"Authorization": "Bearer dev_customer_tracer"}
    ).is_success
    with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        channel.unary_unary(
            "/vmprovisioner.v1.VmService/ListVms",
            request_serializer=lambda m: m.to_binary(),
            response_deserializer=pb.ListVmsResponse.from_binary,
        )(pb.ListVmsRequest(), metadata=[("authorization", "Bearer dev_customer_tracer")], timeout=30)

    def rpc_spans() -> list[Any] | None:
        found = [s for s in Collector.spans if s.name.startswith("vmprovisioner.v1.VmService/")]
        return found if len(found) >= 4 else None

    create, missing, rest_get, grpc_list = sorted(
        eventually(rpc_spans, what="4 RPC spans"), key=lambda s: s.start_time_unix_nano
    )
    assert Collector.resources[0]["service.name"] == "metald-under-test"
    # the caller's trace continues: same trace id, the caller's span as parent
    assert create.trace_id.hex() == trace_id and create.parent_span_id.hex() == "00f067aa0ba902b7"
    assert create.name == "vmprovisioner.v1.VmService/CreateVm" and create.kind == 2  # SERVER
    assert (
        _attrs(create).items()
        >= {
            "rpc.method": "CreateVm",
            "rpc.service": "vmprovisioner.v1.VmService",
            "metald.customer_id": "tracer",
            "metald.vm_id": vm_id,
            "metald.code": "ok",
        }.items()
    )
    children = {s.name for s in Collector.spans if s.parent_span_id == create.span_id}
    assert {"store.insert", "backend.prepare", "store.save"} <= children
    assert _attrs(missing)["metald.code"] == "not_found" and missing.status.code == 2  # ERROR
    assert _attrs(missing)["metald.vm_id"] == "missing-vm"
    # REST calls are RPCs too, and so are gRPC ones
    assert rest_get.name == "vmprovisioner.v1.VmService/GetVmInfo"
    assert _attrs(rest_get)["metald.vm_id"] == vm_id
    assert grpc_list.name == "vmprovisioner.v1.VmService/ListVms"
    assert {s.name for s in Collector.spans if s.parent_span_id == grpc_list.span_id} >= {"store.list_page"}
    assert "Failed to detach context" not in daemon.logs()


def test_a_watch_is_one_span_over_the_whole_stream(start_daemon: StartDaemon, collector: str) -> None:
    daemon = start_daemon(
        "otelstream",
        env={
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    with Client(daemon.url, "dev_customer_streamer") as client:
        first = client.create_vm(vm_id="watched-1").vm_id
        events = client.watch_vms(after_cursor="0", vm_ids=[first, "watched-2"])
        assert next(events).vm_id == first  # kept, replayed
        opened_ns = time.time_ns()
        time.sleep(0.5)
        client.create_vm(vm_id="watched-2")
        assert next(events).vm_id == "watched-2"  # live, half a second into the stream
        received_ns = time.time_ns()
        events.close()

    def watch_span() -> Any:
        found = [s for s in Collector.spans if s.name == "vmprovisioner.v1.VmService/WatchVms"]
        return found[0] if found else None

    span = eventually(watch_span, what="the WatchVms span")
    attrs = _attrs(span)
    assert span.kind == 2 and attrs["rpc.method"] == "WatchVms" and attrs["metald.customer_id"] == "streamer"
    assert span.start_time_unix_nano < opened_ns and span.end_time_unix_nano >= received_ns
    assert attrs["metald.stream.messages_sent"] == 2
    vm_ids = next(a.value.array_value for a in span.attributes if a.key == "metald.vm_ids")
    assert [v.string_value for v in vm_ids.values] == [first, "watched-2"]
    assert next(a.value.bool_value for a in span.attributes if a.key == "rpc.server_streaming")
    creates = [s for s in Collector.spans if s.name == "vmprovisioner.v1.VmService/CreateVm"]
    assert len(creates) == 2 and all(c.trace_id != span.trace_id for c in creates)  # their own traces
    assert "Failed to detach context" not in daemon.logs()
