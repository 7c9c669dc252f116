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
from protobuf import DescFile, DescService

from metald.gen.google.rpc import error_details_pb


def reflection_apps(*services: DescService) -> list[ConnectASGIApplication[object]]:
    """Also the file of google.rpc.ErrorInfo, which every error carries as a detail (its file has
    no service, so the service list is unchanged)."""
    descs: tuple[DescFile | DescService, ...] = (*services, error_details_pb.desc())
    return [
        ServerReflectionASGIApplication(ServerReflectionService(*descs)),
        ServerReflectionAlphaASGIApplication(ServerReflectionAlphaService(*descs)),
    ]
