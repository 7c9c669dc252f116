"""The edge's opt-in settings against a running daemon that sets them: CORS for one configured
browser origin (`cors_allowed_origins`) and per-customer /metrics series behind `metrics_token`.
Their defaults (CORS off, no customer on /metrics) are checked on the shared daemon too."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from metald.gen.vmprovisioner.v1 import vm_pb as pb
from tests.conftest import serving
from tests.support.daemon import Daemon
from tests.support.rpc import SERVICE, Rpc, token

CONSOLE = "https://console.example.com"
METRICS_TOKEN = "scrape-3d1f0c"
RPC_URL_PATH = f"/{SERVICE}/ListVms"
CUSTOMER_SERIES = re.compile(r"^unkey_metald_customer_vms\{", re.MULTILINE)


@pytest.fixture(scope="module")
def edge_daemon(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Iterator[Daemon]:
    with serving(
        Daemon(
            tmp_path_factory.mktemp("edge"),
            assets_dir,
            f"--cors-allowed-origins={CONSOLE}/",  # a trailing slash is the same origin
            f"--metrics-token={METRICS_TOKEN}",
            name="edge-set",
        )
    ) as d:
        yield d


def _preflight(daemon: Daemon, origin: str) -> httpx.Response:
    return httpx.options(
        f"{daemon.url}{RPC_URL_PATH}",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type, connect-protocol-version",
        },
        timeout=30,
    )


# ---- CORS ----------------------------------------------------------------------------------------


def test_preflight_from_the_configured_origin(edge_daemon: Daemon) -> None:
    response = _preflight(edge_daemon, CONSOLE)
    assert response.status_code == 204, response.text
    assert response.headers["access-control-allow-origin"] == CONSOLE
    assert "Origin" in response.headers["vary"]
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = {h.strip() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "connect-protocol-version", "x-grpc-web"} <= allowed
    assert int(response.headers["access-control-max-age"]) > 0
    assert "access-control-allow-credentials" not in response.headers  # bearer tokens, no cookies


@pytest.mark.parametrize("origin", ["https://evil.example.com", "http://console.example.com", "null"])
def test_preflight_from_another_origin_is_not_allowed(edge_daemon: Daemon, origin: str) -> None:
    response = _preflight(edge_daemon, origin)
    assert response.status_code != 204
    assert not any(k.startswith("access-control-") for k in response.headers), response.headers


def test_calls_from_the_configured_origin_can_read_their_answer(edge_daemon: Daemon, customer: str) -> None:
    """Answers and refusals alike carry the allow-origin and the exposed status headers."""
    for authorization, status in ((f"Bearer {token(customer)}", 200), ("Bearer nope", 401)):
        response = httpx.post(
            f"{edge_daemon.url}{RPC_URL_PATH}",
            json={},
            headers={"origin": CONSOLE, "authorization": authorization},
            timeout=30,
        )
        assert response.status_code == status
        assert response.headers["access-control-allow-origin"] == CONSOLE
        exposed = {h.strip() for h in response.headers["access-control-expose-headers"].split(",")}
        assert {"grpc-status", "grpc-message", "x-request-id"} <= exposed
    grpc_web = httpx.post(
        f"{edge_daemon.url}{RPC_URL_PATH}",
        content=b"\0" + len(b"").to_bytes(4, "big"),
        headers={
            "origin": CONSOLE,
            "content-type": "application/grpc-web+proto",
            "x-grpc-web": "1",
            "authorization": f"Bearer {token(customer)}",
        },
        timeout=30,
    )
    assert grpc_web.status_code == 200
    assert grpc_web.headers["access-control-allow-origin"] == CONSOLE
    assert pb.ListVmsResponse.from_binary(grpc_web.content[5 : 5 + int.from_bytes(grpc_web.content[1:5])])


def test_calls_from_another_origin_get_no_cors_headers(edge_daemon: Daemon, customer: str) -> None:
    response = httpx.post(
        f"{edge_daemon.url}{RPC_URL_PATH}",
        json={},
        headers={"origin": "https://evil.example.com", "authorization": f"Bearer {token(customer)}"},
        timeout=30,
    )
    assert response.status_code == 200  # CORS is the browser's wall; the call itself is authorized
    assert "access-control-allow-origin" not in response.headers


def test_preflight_is_refused_by_default(daemon: Daemon) -> None:
    response = _preflight(daemon, CONSOLE)
    assert response.status_code != 204
    assert not any(k.startswith("access-control-") for k in response.headers), response.headers


# ---- metrics_token -------------------------------------------------------------------------------


def _scrape(daemon: Daemon, authorization: str | None = None) -> str:
    headers = {"authorization": authorization} if authorization else {}
    response = httpx.get(f"{daemon.url}/metrics", headers=headers, timeout=30)
    assert response.status_code == 200
    return response.text


def test_customer_series_only_with_the_metrics_token(edge_daemon: Daemon, customer: str) -> None:
    rpc = Rpc(edge_daemon.url, customer)
    try:
        rpc.create()
        rpc.create()
        for authorization in (None, "Bearer wrong", f"Bearer {token(customer)}", METRICS_TOKEN, "Bearer x"):
            scrape = _scrape(edge_daemon, authorization)
            assert customer not in scrape, authorization
            assert not CUSTOMER_SERIES.search(scrape), authorization
            assert "unkey_metald_vms{" in scrape  # the aggregate series are public
        scrape = _scrape(edge_daemon, f"Bearer {METRICS_TOKEN}")
        assert f'unkey_metald_customer_vms{{customer_id="{customer}"}} 2.0' in scrape
        assert customer not in _scrape(edge_daemon), "an authorized scrape left customer series behind"
    finally:
        rpc.delete_all()


def test_no_customer_series_without_a_metrics_token(daemon: Daemon, rpc: Rpc) -> None:
    rpc.create()
    for authorization in (None, "Bearer x", f"Bearer {token(rpc.customer)}"):
        scrape = _scrape(daemon, authorization)
        assert rpc.customer not in scrape and not CUSTOMER_SERIES.search(scrape), authorization
