"""The metald Python SDK: typed sync and async clients for vmprovisioner.v1.VmService.

    from metald.client import Client, NotFoundError, VmState

    with Client("http://127.0.0.1:8080", token="dev_customer_123") as metald:
        vm_id = metald.create_vm({"cpu": {"vcpu_count": 1}}).vm_id
        metald.boot_vm(vm_id, wait_for_ready=True)

Requests and responses are the generated protobuf messages (metald.gen.vmprovisioner.v1.vm_pb);
failures raise ApiError subclasses carrying the code and the server's ErrorInfo. See docs/client.md.
"""

from metald.client.aio import AsyncClient
from metald.client.common import ConsoleChunk, RetryPolicy
from metald.client.errors import (
    AlreadyExistsError,
    ApiError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from metald.client.sync import Client
from metald.gen.vmprovisioner.v1.vm_pb import VmConfig, VmState

__all__ = [
    "AlreadyExistsError",
    "ApiError",
    "AsyncClient",
    "Client",
    "ConsoleChunk",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "UnauthenticatedError",
    "UnavailableError",
    "VmConfig",
    "VmState",
]
