"""`server = pyvoy` pieces that need no Envoy: the shielded receive (pyvoy 1.3 completes receive()
futures the application cancelled), the refusals, the environment put back for children."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from metald.api import pyvoy_host
from metald.api.auth import ConfigError
from metald.api.serve import serve_api
from metald.settings import Settings


async def test_a_cancelled_receive_leaves_the_servers_future_to_complete() -> None:
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Future[dict[str, object]]] = []

    def receive() -> asyncio.Future[dict[str, object]]:
        pending.append(loop.create_future())
        return pending[-1]

    wait = asyncio.ensure_future(pyvoy_host.shielded(receive)())
    await asyncio.sleep(0)
    wait.cancel()  # connectrpc ending its disconnect watch
    with pytest.raises(asyncio.CancelledError):
        await wait
    assert not pending[0].cancelled()
    pending[0].set_result({"type": "http.disconnect"})  # what pyvoy does next: no InvalidStateError
    message = {"type": "http.request", "body": b"x", "more_body": False}
    next_wait = asyncio.ensure_future(pyvoy_host.shielded(receive)())
    await asyncio.sleep(0)
    pending[1].set_result(message)
    assert await next_wait == message


def test_pyvoy_serves_cleartext_only(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("")
    with pytest.raises(ConfigError, match="cleartext only"):
        pyvoy_host.exec_envoy(Settings(server="pyvoy", tls_cert=cert, tls_key=cert), "metald.daemon:run")


async def test_serve_api_outside_envoy_refuses_pyvoy() -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("not served")

    with pytest.raises(ConfigError, match="metald serve"):
        await serve_api(app, Settings(server="pyvoy"))  # a gateway, say: it never runs inside Envoy


def test_children_get_the_environment_from_before_envoy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/lib/libpython3.11.so")
    monkeypatch.setenv("PYTHONHOME", "/venv:/venv")
    monkeypatch.setenv("PYTHONPATH", "/was/before")
    monkeypatch.setenv(
        pyvoy_host._RESTORE, json.dumps({"LD_PRELOAD": None, "PYTHONHOME": None, "PYTHONPATH": "/was/before"})
    )
    monkeypatch.setenv(pyvoy_host._PYTHON, "/venv/bin/python")
    monkeypatch.setattr(sys, "executable", "/envoy")
    pyvoy_host._restore_environment()
    assert "LD_PRELOAD" not in os.environ and "PYTHONHOME" not in os.environ
    assert os.environ["PYTHONPATH"] == "/was/before"
    assert sys.executable == "/venv/bin/python"
    assert pyvoy_host._PYTHON not in os.environ and pyvoy_host._RESTORE not in os.environ


def test_envoy_runs_the_command_that_entered_it() -> None:
    from metald.daemon import run
    from metald.fleet.serve import run_gateway

    assert pyvoy_host._runner("metald.fleet.serve:run_gateway") is run_gateway
    assert pyvoy_host._runner("metald.daemon:run") is run
