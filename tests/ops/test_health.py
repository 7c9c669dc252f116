"""GET /health and grpc.health.v1.Health against running daemons: the reference's shape, and the
status moving with the world (the QEMU binary taken away and put back, a nearly full disk)."""

from __future__ import annotations

import contextlib
import queue
import subprocess
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import grpc
import httpx
import jsonschema
import pytest

from metald import __version__
from metald.api.health import HEALTH_SCHEMA, overall_status
from metald.gen.grpc.health.v1.health_pb import (
    HealthCheckRequest,
    HealthCheckResponse,
    HealthListRequest,
    HealthListResponse,
)
from tests.ops.conftest import QemuLink, StartDaemon
from tests.ops.support import eventually
from tests.support.daemon import Daemon

Serving = HealthCheckResponse.ServingStatus
HEALTH = "grpc.health.v1.Health"


def _health(daemon: Daemon) -> tuple[int, dict]:
    response = httpx.get(f"{daemon.url}/health", timeout=10)
    assert response.headers["content-type"] == "application/json"
    return response.status_code, response.json()


def _check(daemon: Daemon, service: str = "") -> Serving:
    with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        call = channel.unary_unary(
            f"/{HEALTH}/Check",
            request_serializer=lambda m: m.to_binary(),
            response_deserializer=HealthCheckResponse.from_binary,
        )
        return call(HealthCheckRequest(service=service), timeout=10).status


@contextlib.contextmanager
def _watch(daemon: Daemon, service: str = "") -> Iterator[queue.Queue[Serving]]:
    """Statuses from a grpc.health.v1.Health/Watch stream as they arrive."""
    seen: queue.Queue[Serving] = queue.Queue()
    channel = grpc.insecure_channel(f"127.0.0.1:{daemon.port}")
    stream = channel.unary_stream(
        f"/{HEALTH}/Watch",
        request_serializer=lambda m: m.to_binary(),
        response_deserializer=HealthCheckResponse.from_binary,
    )(HealthCheckRequest(service=service), timeout=120)

    def pump() -> None:
        with contextlib.suppress(grpc.RpcError):
            for message in stream:
                seen.put(message.status)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stream.cancel()
        channel.close()
        thread.join(10)


def test_health_has_the_reference_shape(daemon: Daemon) -> None:
    status, body = _health(daemon)
    jsonschema.validate(body, HEALTH_SCHEMA)
    # the reference's keys, exactly (each check may add a `detail` string)
    assert set(body) == {"status", "timestamp", "version", "backend", "system", "checks"}
    assert set(body["backend"]) == {"type", "status"}
    assert set(body["system"]) == {"uptime_seconds", "memory_usage_mb", "cpu_usage_percent"}
    assert (status, body["status"]) == (200, "healthy"), body
    assert body["backend"] == {"type": "qemu", "status": "healthy"}
    assert body["version"] == __version__
    assert body["system"]["memory_usage_mb"] > 10
    datetime.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%SZ")
    # real checks: the VMM binary answered, SQLite answered, the data dir's disk, the bridges' netns
    checks = body["checks"]
    assert set(checks) == {"backend_ping", "store", "disk", "network", "warm_pool"}  # warm_pool: issue 13
    assert "QEMU emulator version" in checks["backend_ping"]["detail"]
    assert "slots ready" in checks["warm_pool"]["detail"]
    assert "MiB free" in checks["disk"]["detail"]
    assert "host namespace" in checks["network"]["detail"]
    for check in checks.values():
        assert check["status"] == "healthy" and check["duration_ms"] >= 0
    # no auth needed; plain curl works too
    out = subprocess.run(["curl", "-sf", f"{daemon.url}/health"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and '"status": "healthy"' in out.stdout


@pytest.mark.parametrize(
    ("statuses", "overall"),
    [
        ({"backend_ping": "healthy", "store": "healthy", "disk": "healthy"}, "healthy"),
        ({"backend_ping": "healthy", "store": "healthy", "network": "unhealthy"}, "degraded"),
        ({"backend_ping": "healthy", "store": "healthy", "disk": "degraded"}, "degraded"),
        ({"backend_ping": "unhealthy", "store": "healthy", "disk": "healthy"}, "unhealthy"),
        ({"backend_ping": "healthy", "store": "unhealthy", "network": "unhealthy"}, "unhealthy"),
        ({"backend_ping": "degraded", "store": "healthy"}, "degraded"),
    ],
)
def test_documented_rules(statuses: dict[str, str], overall: str) -> None:
    assert overall_status(statuses) == overall


def test_grpc_health_check_and_list(daemon: Daemon) -> None:
    assert _check(daemon) == Serving.SERVING
    assert _check(daemon, "vmprovisioner.v1.VmService") == Serving.SERVING
    with pytest.raises(grpc.RpcError) as caught:
        _check(daemon, "no.such.Service")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        listed = channel.unary_unary(
            f"/{HEALTH}/List",
            request_serializer=lambda m: m.to_binary(),
            response_deserializer=HealthListResponse.from_binary,
        )(HealthListRequest(), timeout=10)
    assert {k: v.status for k, v in listed.statuses.items()} == {
        "": Serving.SERVING,
        "vmprovisioner.v1.VmService": Serving.SERVING,
    }


def test_backend_binary_gone_and_back(start_daemon: StartDaemon, qemu_link: QemuLink) -> None:
    """healthy -> unhealthy (503, NOT_SERVING, pushed to Watch) -> healthy again."""
    daemon = start_daemon("flaky", "--qemu-binary", str(qemu_link.path))
    assert _health(daemon)[0] == 200
    with _watch(daemon) as statuses:
        assert statuses.get(timeout=10) == Serving.SERVING
        qemu_link.remove()
        _, body = eventually(lambda: (r := _health(daemon))[0] == 503 and r, what="503")
        assert body["status"] == "unhealthy"
        assert body["backend"]["status"] == "unhealthy"
        assert body["checks"]["backend_ping"]["status"] == "unhealthy"
        assert "No such file" in body["checks"]["backend_ping"]["detail"]
        assert body["checks"]["store"]["status"] == "healthy"
        assert _check(daemon) == Serving.NOT_SERVING
        assert statuses.get(timeout=10) == Serving.NOT_SERVING

        qemu_link.restore()
        eventually(lambda: _health(daemon)[0] == 200, what="200 again")
        assert _health(daemon)[1]["status"] == "healthy"
        assert statuses.get(timeout=10) == Serving.SERVING
    assert _check(daemon) == Serving.SERVING


def test_missing_vmm_binary_is_unhealthy_from_the_start(start_daemon: StartDaemon) -> None:
    daemon = start_daemon("nobin", "--qemu-binary", "/nonexistent")
    status, body = _health(daemon)
    assert (status, body["status"]) == (503, "unhealthy")
    assert body["checks"]["backend_ping"]["status"] == "unhealthy"
    assert _check(daemon) == Serving.NOT_SERVING


def test_low_disk_is_degraded(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """A data dir on a 200 MiB tmpfs: below the 1 GiB floor -> degraded, still HTTP 200 / SERVING."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        daemon = start_daemon("lowdisk", data_dir=mount / "state")
        status, body = _health(daemon)
        assert (status, body["status"]) == (200, "degraded"), body
        assert body["checks"]["disk"]["status"] == "degraded"
        assert body["checks"]["backend_ping"]["status"] == "healthy"
        assert _check(daemon) == Serving.SERVING
        daemon.stop()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
