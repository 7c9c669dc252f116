"""grpc.health.v1.Health over the same checks as GET /health (no authentication, like /health).

`healthy` and `degraded` are SERVING, `unhealthy` is NOT_SERVING, for the overall server ("")
and for every service it names; any other service name is NOT_FOUND (Check) or SERVICE_UNKNOWN
(Watch), as the upstream protocol says.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from metald.api.health import HealthReporter
from metald.gen.grpc.health.v1.health_connect import Health, HealthASGIApplication
from metald.gen.grpc.health.v1.health_pb import (
    HealthCheckRequest,
    HealthCheckResponse,
    HealthListRequest,
    HealthListResponse,
)

Serving = HealthCheckResponse.ServingStatus
Ctx = RequestContext[Any, Any]


class GrpcHealth(Health):
    def __init__(
        self, reporter: HealthReporter, services: Iterable[str], watch_interval: float = 1.0
    ) -> None:
        self._reporter = reporter
        self._services = frozenset({"", *services})
        self._interval = watch_interval

    async def _serving(self, service: str) -> Serving:
        if service not in self._services:
            return Serving.SERVICE_UNKNOWN
        status = await self._reporter.status()
        return Serving.NOT_SERVING if status == "unhealthy" else Serving.SERVING

    async def check(self, request: HealthCheckRequest, ctx: Ctx, /) -> HealthCheckResponse:
        serving = await self._serving(request.service)
        if serving is Serving.SERVICE_UNKNOWN:
            raise ConnectError(Code.NOT_FOUND, f"unknown service {request.service!r}")
        return HealthCheckResponse(status=serving)

    async def list(self, request: HealthListRequest, ctx: Ctx, /) -> HealthListResponse:
        serving = await self._serving("")
        return HealthListResponse(statuses={s: HealthCheckResponse(status=serving) for s in self._services})

    async def watch(self, request: HealthCheckRequest, ctx: Ctx, /) -> AsyncIterator[HealthCheckResponse]:
        """The current status at once, then each change, until the client goes away."""
        last: Serving | None = None
        while True:
            serving = await self._serving(request.service)
            if serving != last:
                last = serving
                yield HealthCheckResponse(status=serving)
            await asyncio.sleep(self._interval)


def health_app(reporter: HealthReporter, services: Iterable[str]) -> HealthASGIApplication:
    return HealthASGIApplication(GrpcHealth(reporter, services))
