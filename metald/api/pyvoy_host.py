"""`server = pyvoy` (opt-in): the daemon inside pyvoy's Envoy instead of hypercorn.

pyvoy runs an ASGI application inside Envoy's process (an embedded interpreter on an asyncio loop
of its own thread), loaded by name. So `metald serve` (or `metald gateway`) replaces itself with
Envoy (same pid: a service manager's signals and kill -9, the VMM supervisors' parent, the tests'
daemon are still the daemon), and Envoy loads `HOST`, whose lifespan runs the same command's run
function (`metald.daemon.run` or `metald.fleet.serve.run_gateway`, named in the environment) with
the settings this process parsed; that run's `serve_api` hands its application to `HOST` and serves
until Envoy shuts the lifespan down (SIGTERM). Envoy's own admin listener is left out of its
configuration.

What Envoy needs in its environment to load Python (LD_PRELOAD of libpython, PYTHONHOME,
PYTHONPATH) is put back as it was before anything is spawned, and `sys.executable` (Envoy's binary
in there) is this interpreter again, so VMM supervisors and host tools start as under hypercorn.

Cleartext only (HTTP/1.1 and h2c on one port): TLS and mTLS stay with hypercorn. pyvoy 1.3 also
completes a receive() future the application has cancelled (connectrpc's disconnect watch of every
streaming and gRPC call), which raises inside pyvoy and logs a traceback per call: each receive()
is therefore shielded (`shielded`).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from metald.api.asgi import ASGIApp, Message, Receive, Scope, Send
from metald.api.auth import ConfigError
from metald.settings import Settings

ENTRY = "metald.api.pyvoy_host:HOST"
_SETTINGS = "METALD_PYVOY_SETTINGS"  # the parsed settings, as JSON, for the run inside Envoy
_RESTORE = "METALD_PYVOY_RESTORE"  # {name: value or null} of the variables set for Envoy
_PYTHON = "METALD_PYVOY_PYTHON"
_RUN = "METALD_PYVOY_RUN"  # "module:function", the command's run(settings) to call inside Envoy
Run = Callable[[Settings], Awaitable[None]]


def inside_envoy() -> bool:
    return HOST.settings is not None


def enter_envoy(settings: Settings, run: str) -> None:
    """With server = pyvoy and outside Envoy: become Envoy, which calls `run` ("module:function",
    the caller itself) again inside it. Otherwise nothing."""
    if settings.server == "pyvoy" and not inside_envoy():
        exec_envoy(settings, run)


def exec_envoy(settings: Settings, run: str) -> NoReturn:
    """Become Envoy serving `run(settings)` (does not return)."""
    if settings.tls_cert or settings.tls_key:
        raise ConfigError("server = pyvoy serves cleartext only; use server = hypercorn for TLS")
    try:  # not a dependency of metald: an operator who chooses pyvoy installs it
        pyvoy: Any = importlib.import_module("pyvoy._server")
    except ImportError:
        raise ConfigError("server = pyvoy needs the pyvoy package: pip install pyvoy==1.3.0") from None
    host, port = settings.host_port
    server = pyvoy.PyvoyServer(  # asyncio, not pyvoy's default uvloop (docs/operations.md says why)
        ENTRY, address=host, port=port, loop="asyncio", worker_threads=1, lifespan=True
    )
    config = server.get_envoy_config()
    config.pop("admin", None)
    for_envoy: dict[str, str] = pyvoy.get_envoy_environ()
    env = {**os.environ, **for_envoy}
    env[_SETTINGS] = settings.model_dump_json(exclude_unset=False)
    env[_RESTORE] = json.dumps({name: os.environ.get(name) for name in for_envoy})
    env[_PYTHON] = sys.executable
    env[_RUN] = run
    envoy: str = pyvoy.get_envoy_path()
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [envoy, "--config-yaml", json.dumps(config), "--use-dynamic-base-id", "--log-level", "error"]
    os.execve(envoy, argv, env)


def shielded(receive: Receive) -> Receive:
    async def receive_once() -> Message:
        return await asyncio.shield(receive())

    return receive_once


class Host:
    """The application Envoy serves: its lifespan is the daemon's run."""

    def __init__(self) -> None:
        raw = os.environ.get(_SETTINGS)
        self.settings = Settings.model_validate(json.loads(raw)) if raw else None
        self.run = os.environ.get(_RUN, "")
        self._app: asyncio.Future[ASGIApp] | None = None
        self._stop: asyncio.Event | None = None

    async def serve(self, app: ASGIApp) -> None:
        """Called by serve_api inside Envoy: serve `app` until the lifespan ends."""
        assert self._app is not None and self._stop is not None
        self._app.set_result(app)
        await self._stop.wait()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        assert self._app is not None
        app = await asyncio.shield(self._app)
        await app(scope, shielded(receive) if scope["type"] == "http" else receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        assert self.settings is not None
        run = _runner(self.run)
        loop = asyncio.get_running_loop()
        _accept_shutdown_timeout(loop)
        _restore_environment()
        watcher = asyncio.PidfdChildWatcher()  # as `metald serve` does, on this (non-main) thread's loop
        watcher.attach_loop(loop)
        asyncio.set_child_watcher(watcher)
        self._app, self._stop = loop.create_future(), asyncio.Event()
        await receive()  # lifespan.startup
        running = asyncio.ensure_future(run(self.settings))
        either: set[asyncio.Future[Any]] = {running, self._app}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if running.done():
            await send({"type": "lifespan.startup.failed", "message": _failure(running)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        self._stop.set()
        await asyncio.wait([running])
        if running.exception() is not None:
            await send({"type": "lifespan.shutdown.failed", "message": _failure(running)})
            return
        await send({"type": "lifespan.shutdown.complete"})


def _runner(name: str) -> Run:
    module, _, function = name.partition(":")
    run: Run = getattr(importlib.import_module(module), function)
    return run


def _failure(task: asyncio.Future[Any]) -> str:
    exc = task.exception()
    message = f"metald: {exc}" if exc is not None else "metald: the daemon ended before serving"
    print(message, file=sys.stderr, flush=True)
    return message


def _accept_shutdown_timeout(loop: asyncio.AbstractEventLoop) -> None:
    """pyvoy 1.3 ends its loop with shutdown_default_executor(timeout), Python 3.12's signature;
    on 3.11 that raises and Envoy panics on exit instead of ending cleanly."""
    if sys.version_info >= (3, 12):
        return
    shutdown = loop.shutdown_default_executor

    async def shutdown_default_executor(timeout: float | None = None) -> None:
        await shutdown()

    loop.shutdown_default_executor = shutdown_default_executor  # type: ignore[method-assign]


def _restore_environment() -> None:
    for name, value in json.loads(os.environ.pop(_RESTORE, "{}")).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    sys.executable = os.environ.pop(_PYTHON, sys.executable)
    os.environ.pop(_SETTINGS, None)
    os.environ.pop(_RUN, None)


HOST = Host()
