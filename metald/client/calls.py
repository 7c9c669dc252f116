"""The SDK's calls as data: each function takes a method's arguments and says what to send (the
RPC from metald.client.rpcs and its request, or a REST GET) and how long it may take. Both
clients get their methods from these (metald.client.core) and only carry them out."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

from pyqwest import FullResponse

from metald.client import common, rpcs
from metald.client.common import ConfigLike, ConsoleChunk, StateLike
from metald.gen.vmprovisioner.v1 import vm_pb as pb

R = TypeVar("R")


@dataclass(frozen=True)
class RpcCall(Generic[R]):
    """`min_timeout`: the call may take at least this long (the server itself waits: a boot
    until the guest is up, a graceful shutdown, a command); the client's timeout otherwise."""

    rpc: rpcs.Rpc[Any, R]
    request: Any
    min_timeout: float = 0.0


@dataclass(frozen=True)
class HttpGet(Generic[R]):
    """A REST endpoint beside the RPCs (the console, /health): `path` under the daemon's URL."""

    path: str
    parse: Callable[[FullResponse], R]


Call: TypeAlias = RpcCall[R] | HttpGet[R]


def create_vm(
    config: ConfigLike = None, *, vm_id: str = "", snapshot_id: str = ""
) -> Call[pb.CreateVmResponse]:
    """Create a VM (`snapshot_id`: a clone of that snapshot; CPU, memory, boot and disks are
    the snapshot's)."""
    request = pb.CreateVmRequest(vm_id=vm_id, config=common.config(config), snapshot_id=snapshot_id)
    return RpcCall(rpcs.CREATE_VM, request)


def boot_vm(
    vm_id: str, *, wait_for_ready: bool = False, wait_timeout_seconds: int = 0
) -> Call[pb.BootVmResponse]:
    """Boot (a clone: restore) a VM; with wait_for_ready, until its guest is up."""
    request = pb.BootVmRequest(
        vm_id=vm_id, wait_for_ready=wait_for_ready, wait_timeout_seconds=wait_timeout_seconds
    )
    return RpcCall(rpcs.BOOT_VM, request, common.boot_timeout(wait_for_ready, wait_timeout_seconds, 0.0))


def shutdown_vm(vm_id: str, *, force: bool = False, timeout_seconds: int = 0) -> Call[pb.ShutdownVmResponse]:
    """Shut a VM down, gracefully (up to timeout_seconds) unless `force`."""
    request = pb.ShutdownVmRequest(vm_id=vm_id, force=force, timeout_seconds=timeout_seconds)
    return RpcCall(rpcs.SHUTDOWN_VM, request, common.shutdown_timeout(force, timeout_seconds, 0.0))


def pause_vm(vm_id: str) -> Call[pb.PauseVmResponse]:
    return RpcCall(rpcs.PAUSE_VM, pb.PauseVmRequest(vm_id=vm_id))


def resume_vm(vm_id: str) -> Call[pb.ResumeVmResponse]:
    return RpcCall(rpcs.RESUME_VM, pb.ResumeVmRequest(vm_id=vm_id))


def reboot_vm(vm_id: str, *, force: bool = False) -> Call[pb.RebootVmResponse]:
    return RpcCall(rpcs.REBOOT_VM, pb.RebootVmRequest(vm_id=vm_id, force=force))


def delete_vm(vm_id: str, *, force: bool = False) -> Call[pb.DeleteVmResponse]:
    return RpcCall(rpcs.DELETE_VM, pb.DeleteVmRequest(vm_id=vm_id, force=force))


def get_vm_info(vm_id: str) -> Call[pb.GetVmInfoResponse]:
    return RpcCall(rpcs.GET_VM_INFO, pb.GetVmInfoRequest(vm_id=vm_id))


def list_vms(
    *, states: Iterable[StateLike] = (), page_size: int = 0, page_token: str = ""
) -> Call[pb.ListVmsResponse]:
    """One page of the caller's VMs (iter_vms walks every page)."""
    request = pb.ListVmsRequest(
        state_filter=[common.state(s) for s in states], page_size=page_size, page_token=page_token
    )
    return RpcCall(rpcs.LIST_VMS, request)


def snapshot_vm(
    vm_id: str, *, snapshot_id: str = "", metadata: Mapping[str, str] | None = None, warm_pool_size: int = 0
) -> Call[pb.SnapshotVmResponse]:
    """Snapshot a RUNNING or PAUSED VM (it ends in the state it was in); `snapshot_id` is
    generated as snap_... when empty."""
    request = pb.SnapshotVmRequest(
        vm_id=vm_id, snapshot_id=snapshot_id, metadata=dict(metadata or {}), warm_pool_size=warm_pool_size
    )
    return RpcCall(rpcs.SNAPSHOT_VM, request)


def list_snapshots(*, page_size: int = 0, page_token: str = "") -> Call[pb.ListSnapshotsResponse]:
    """One page of the caller's snapshots, oldest first (iter_snapshots walks every page)."""
    return RpcCall(rpcs.LIST_SNAPSHOTS, pb.ListSnapshotsRequest(page_size=page_size, page_token=page_token))


def delete_snapshot(snapshot_id: str) -> Call[pb.DeleteSnapshotResponse]:
    """The snapshot disappears at once; its files stay until its last clone is deleted."""
    return RpcCall(rpcs.DELETE_SNAPSHOT, pb.DeleteSnapshotRequest(snapshot_id=snapshot_id))


def exec_vm(
    vm_id: str,
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: bytes = b"",
    working_dir: str = "",
    timeout_seconds: int = 0,
) -> Call[pb.ExecVmResponse]:
    """Run argv in the running guest; the call waits for the command (+ a margin)."""
    request = pb.ExecVmRequest(
        vm_id=vm_id, command=list(command), env=dict(env or {}), stdin=stdin,
        working_dir=working_dir, timeout_seconds=timeout_seconds,
    )  # fmt: skip
    return RpcCall(rpcs.EXEC_VM, request, common.exec_timeout(timeout_seconds, 0.0))


def write_file(vm_id: str, path: str, content: bytes, *, mode: int = 0) -> Call[pb.WriteFileResponse]:
    return RpcCall(rpcs.WRITE_FILE, pb.WriteFileRequest(vm_id=vm_id, path=path, content=content, mode=mode))


def read_file(vm_id: str, path: str) -> Call[pb.ReadFileResponse]:
    return RpcCall(rpcs.READ_FILE, pb.ReadFileRequest(vm_id=vm_id, path=path))


def watch_vms(
    *, states: Iterable[StateLike] = (), vm_ids: Iterable[str] = (), after_cursor: str = ""
) -> RpcCall[pb.VmEvent]:
    """WatchVms from `after_cursor` (empty: live events only). A stream has no deadline."""
    request = pb.WatchVmsRequest(
        state_filter=[common.state(s) for s in states], vm_ids=list(vm_ids), after_cursor=after_cursor
    )
    return RpcCall(rpcs.WATCH_VMS, request)


def console(vm_id: str, offset: int = 0, limit: int = 1 << 20) -> Call[ConsoleChunk]:
    """Console output from `offset` (at most `limit` bytes)."""
    parse = functools.partial(common.console_chunk, offset=offset)
    return HttpGet(common.console_path(vm_id, offset, limit), parse)


def health() -> Call[dict[str, Any]]:
    """GET /health: the reference's JSON, whatever the status."""
    return HttpGet("/health", common.health_body)
