"""gRPC server reflection (v1 and v1alpha) for the daemon's services, so `buf curl`, grpcurl and
friends work without the proto files. No authentication: it reveals the public schema only."""

from __future__ import annotations

from connectrpc.server import ConnectASGIApplication
from connectrpc_grpcreflect import (
    ServerReflectionAlphaASGIApplication,
    ServerReflectionAlphaService,
    ServerReflectionASGIApplication,
    ServerReflectionService,
)
from protobuf import DescService


def reflection_apps(*services: DescService) -> list[ConnectASGIApplication[object]]:
    return [
        ServerReflectionASGIApplication(ServerReflectionService(*services)),
        ServerReflectionAlphaASGIApplication(ServerReflectionAlphaService(*services)),
    ]
