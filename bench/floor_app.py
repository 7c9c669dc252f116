"""The framework floor: the daemon's server stack answering with constant responses.

The same ASGI layers as metald/daemon.py builds them (RootApp -> ReferenceStatusMiddleware ->
connectrpc's VmService application with the daemon's codecs and its Auth and Error interceptors,
JSON logging of every call), served the same way (metald.api.serve), but the handler returns a
GetVmInfoResponse / ListVmsResponse decoded once from bytes the real daemon answered: the same
message, the same size, encoded anew on every call. What the daemon costs beyond this is its own
work (use case, store, conversion, backend, network); the floor is what any handler would pay.

`python -m bench.floor_app --listen 127.0.0.1:PORT --responses DIR` (DIR holds GetVmInfo.bin and
ListVms.bin). With `--bare`, only connectrpc's application with the codecs (no middleware, no
interceptors): the difference to the full floor is the cost of the daemon's own layers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from connectrpc.codec import proto_binary_codec
from connectrpc.request import RequestContext

from metald.api.app import RootApp, Route
from metald.api.asgi import ASGIApp
from metald.api.auth import DevTokenAuthenticator
from metald.api.codec import SnakeCaseJsonCodec
from metald.api.health import HealthReporter
from metald.api.interceptor import AuthInterceptor, ErrorInterceptor
from metald.api.metrics import Metrics
from metald.api.serve import serve_api
from metald.api.status import ReferenceStatusMiddleware
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.gen.vmprovisioner.v1.vm_connect import VmService, VmServiceASGIApplication
from metald.logs import configure_logging
from metald.settings import load_settings

Ctx = RequestContext[Any, Any]


class ConstantHandler(VmService):
    """GetVmInfo and ListVms answer a fixed message whatever the request; the rest is UNIMPLEMENTED."""

    def __init__(self, info: pb.GetVmInfoResponse, page: pb.ListVmsResponse) -> None:
        self._info = info
        self._page = page

    async def get_vm_info(self, request: pb.GetVmInfoRequest, ctx: Ctx, /) -> pb.GetVmInfoResponse:
        return self._info

    async def list_vms(self, request: pb.ListVmsRequest, ctx: Ctx, /) -> pb.ListVmsResponse:
        return self._page


class _NoStore:
    """RootApp wants a store only for /metrics, which the floor is never asked for."""


def build_app(responses: Path, *, bare: bool = False) -> ASGIApp:
    handler = ConstantHandler(
        pb.GetVmInfoResponse.from_binary((responses / "GetVmInfo.bin").read_bytes()),
        pb.ListVmsResponse.from_binary((responses / "ListVms.bin").read_bytes()),
    )
    codecs = [proto_binary_codec(), SnakeCaseJsonCodec()]
    if bare:
        return VmServiceASGIApplication(handler, codecs=codecs)
    metrics = Metrics()
    connect_app = VmServiceASGIApplication(
        handler,
        interceptors=[AuthInterceptor(DevTokenAuthenticator(), metrics), ErrorInterceptor()],
        read_max_bytes=load_settings().max_request_bytes,
        codecs=codecs,
    )
    return RootApp(
        routes=[Route.service(connect_app, ReferenceStatusMiddleware(connect_app))],
        health=HealthReporter(backend_type="floor", checks={}, data_dir=responses),
        metrics=metrics,
        store=_NoStore(),  # type: ignore[arg-type]
        openapi=b"{}",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor_app", description=__doc__)
    p.add_argument("--listen", required=True, help="HOST:PORT")
    p.add_argument("--responses", type=Path, required=True, help="dir with GetVmInfo.bin and ListVms.bin")
    p.add_argument("--bare", action="store_true", help="connectrpc alone: no middleware, no interceptors")
    p.add_argument("--server", choices=("hypercorn", "pyvoy"), default="hypercorn")
    args = p.parse_args(argv)
    if args.server == "pyvoy":
        asyncio.run(serve_pyvoy(args.listen, args.responses.resolve(), bare=args.bare))
        return 0
    settings = load_settings(listen=args.listen)
    configure_logging("json", "info")  # as the benchmark's daemon logs: one line per call
    asyncio.run(serve_api(build_app(args.responses, bare=args.bare), settings))
    return 0


async def serve_pyvoy(listen: str, responses: Path, *, bare: bool) -> None:
    """The same application inside pyvoy's Envoy (a child process: its CPU is the floor's), on
    the standard asyncio loop and one worker thread, until SIGTERM."""
    from pyvoy import PyvoyServer

    host, _, port = listen.rpartition(":")
    env = {"BENCH_FLOOR_RESPONSES": str(responses), "BENCH_FLOOR_BARE": "1" if bare else "0"}
    env["BENCH_FLOOR_SHIELD"] = os.environ.get("BENCH_FLOOR_SHIELD", "1")  # bench/floor_pyvoy.py
    server = PyvoyServer(
        "bench.floor_pyvoy:app",
        address=host,
        port=int(port),
        loop="asyncio",
        worker_threads=1,
        env=env,
        stdout=None,
        stderr=None,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    sys.exit(main())
