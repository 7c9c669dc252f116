"""Every RPC of vmprovisioner.v1.VmService, once: its name, request and response types, whether it
streams, and whether the SDK may retry it. Both clients send what this table says
(tests/unit/test_client_core.py holds it against the service's own descriptor)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType

from metald.gen.vmprovisioner.v1 import vm_pb as pb

SERVICE = "vmprovisioner.v1.VmService"
Req = TypeVar("Req")
Res = TypeVar("Res")


@dataclass(frozen=True)
class Rpc(Generic[Req, Res]):
    """One RPC. `retried`: a read, safe to send again on a retryable code (writes never are:
    the first attempt may have taken effect)."""

    method: MethodInfo[Req, Res]
    retried: bool = False

    @property
    def streaming(self) -> bool:
        return self.method.stream_type is StreamType.SERVER_STREAM


def _rpc(
    name: str,
    request: type[Req],
    response: type[Res],
    *,
    read: bool = False,
    stream: bool = False,
    retried: bool | None = None,
) -> Rpc[Req, Res]:
    """`read`: declared without side effects in the proto (and so retried, unless `retried`
    says otherwise)."""
    method = MethodInfo(
        name=name,
        service_name=SERVICE,
        input=request,
        output=response,
        idempotency_level=IdempotencyLevel.NO_SIDE_EFFECTS if read else IdempotencyLevel.UNKNOWN,
        stream_type=StreamType.SERVER_STREAM if stream else StreamType.UNARY,
    )
    return Rpc(method, retried=read if retried is None else retried)


CREATE_VM = _rpc("CreateVm", pb.CreateVmRequest, pb.CreateVmResponse)
DELETE_VM = _rpc("DeleteVm", pb.DeleteVmRequest, pb.DeleteVmResponse)
BOOT_VM = _rpc("BootVm", pb.BootVmRequest, pb.BootVmResponse)
SHUTDOWN_VM = _rpc("ShutdownVm", pb.ShutdownVmRequest, pb.ShutdownVmResponse)
PAUSE_VM = _rpc("PauseVm", pb.PauseVmRequest, pb.PauseVmResponse)
RESUME_VM = _rpc("ResumeVm", pb.ResumeVmRequest, pb.ResumeVmResponse)
REBOOT_VM = _rpc("RebootVm", pb.RebootVmRequest, pb.RebootVmResponse)
GET_VM_INFO = _rpc("GetVmInfo", pb.GetVmInfoRequest, pb.GetVmInfoResponse, read=True)
LIST_VMS = _rpc("ListVms", pb.ListVmsRequest, pb.ListVmsResponse, read=True)
SNAPSHOT_VM = _rpc("SnapshotVm", pb.SnapshotVmRequest, pb.SnapshotVmResponse)
LIST_SNAPSHOTS = _rpc("ListSnapshots", pb.ListSnapshotsRequest, pb.ListSnapshotsResponse, read=True)
DELETE_SNAPSHOT = _rpc("DeleteSnapshot", pb.DeleteSnapshotRequest, pb.DeleteSnapshotResponse)
EXEC_VM = _rpc("ExecVm", pb.ExecVmRequest, pb.ExecVmResponse)
WRITE_FILE = _rpc("WriteFile", pb.WriteFileRequest, pb.WriteFileResponse)
# Reading a guest file has no side effect, though the proto does not declare it so.
READ_FILE = _rpc("ReadFile", pb.ReadFileRequest, pb.ReadFileResponse, retried=True)
WATCH_VMS = _rpc("WatchVms", pb.WatchVmsRequest, pb.VmEvent, stream=True)

ALL: tuple[Rpc[Any, Any], ...] = (
    CREATE_VM, DELETE_VM, BOOT_VM, SHUTDOWN_VM, PAUSE_VM, RESUME_VM, REBOOT_VM, GET_VM_INFO,
    LIST_VMS, SNAPSHOT_VM, LIST_SNAPSHOTS, DELETE_SNAPSHOT, EXEC_VM, WRITE_FILE, READ_FILE, WATCH_VMS,
)  # fmt: skip
