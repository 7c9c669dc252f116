"""vmprovisioner.v1.VmService over the service's use cases: translation only, no decisions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from connectrpc.request import RequestContext

from metald.api.convert import (
    config_from_proto,
    config_to_proto,
    created_timestamp,
    state_from_proto,
    state_to_proto,
    timestamp,
    to_message,
)
from metald.api.interceptor import current_customer
from metald.domain.snapshots import Snapshot
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.gen.vmprovisioner.v1.vm_connect import VmService as VmServiceProtocol
from metald.usecases import ExecCommand, VmDetails, VmUseCases

Ctx = RequestContext[Any, Any]


class VmServiceHandler(VmServiceProtocol):
    def __init__(self, service: VmUseCases) -> None:
        self._svc = service

    async def create_vm(self, request: pb.CreateVmRequest, ctx: Ctx, /) -> pb.CreateVmResponse:
        vm = await self._svc.create(
            current_customer.get(),
            request.vm_id,
            config_from_proto(request.config),
            request.customer_id,
            snapshot_id=request.snapshot_id,
        )
        return pb.CreateVmResponse(vm_id=vm.vm_id, state=state_to_proto(vm.state))

    async def delete_vm(self, request: pb.DeleteVmRequest, ctx: Ctx, /) -> pb.DeleteVmResponse:
        await self._svc.delete(current_customer.get(), request.vm_id, force=request.force)
        return pb.DeleteVmResponse(success=True)

    async def boot_vm(self, request: pb.BootVmRequest, ctx: Ctx, /) -> pb.BootVmResponse:
        vm = await self._svc.boot(
            current_customer.get(),
            request.vm_id,
            wait_for_ready=request.wait_for_ready,
            wait_timeout=float(request.wait_timeout_seconds),
        )
        return pb.BootVmResponse(success=True, state=state_to_proto(vm.state))

    async def shutdown_vm(self, request: pb.ShutdownVmRequest, ctx: Ctx, /) -> pb.ShutdownVmResponse:
        vm = await self._svc.shutdown(
            current_customer.get(),
            request.vm_id,
            force=request.force,
            timeout_seconds=float(request.timeout_seconds),
        )
        return pb.ShutdownVmResponse(success=True, state=state_to_proto(vm.state))

    async def pause_vm(self, request: pb.PauseVmRequest, ctx: Ctx, /) -> pb.PauseVmResponse:
        vm = await self._svc.pause(current_customer.get(), request.vm_id)
        return pb.PauseVmResponse(success=True, state=state_to_proto(vm.state))

    async def resume_vm(self, request: pb.ResumeVmRequest, ctx: Ctx, /) -> pb.ResumeVmResponse:
        vm = await self._svc.resume(current_customer.get(), request.vm_id)
        return pb.ResumeVmResponse(success=True, state=state_to_proto(vm.state))

    async def reboot_vm(self, request: pb.RebootVmRequest, ctx: Ctx, /) -> pb.RebootVmResponse:
        vm = await self._svc.reboot(current_customer.get(), request.vm_id, force=request.force)
        return pb.RebootVmResponse(success=True, state=state_to_proto(vm.state))

    async def get_vm_info(self, request: pb.GetVmInfoRequest, ctx: Ctx, /) -> pb.GetVmInfoResponse:
        return info_to_proto(await self._svc.info(current_customer.get(), request.vm_id))

    async def list_vms(self, request: pb.ListVmsRequest, ctx: Ctx, /) -> pb.ListVmsResponse:
        page = await self._svc.list(
            current_customer.get(),
            [state_from_proto(s) for s in request.state_filter],
            request.page_size,
            request.page_token,
        )
        return pb.ListVmsResponse(
            vms=[
                pb.VmInfo(
                    vm_id=vm.vm_id,
                    config=config_to_proto(vm.config),
                    state=state_to_proto(vm.state),
                    created_at=created_timestamp(vm.created_at),
                )
                for vm in page.vms
            ],
            next_page_token=page.next_page_token,
            total_count=page.total_count,
        )

    async def snapshot_vm(self, request: pb.SnapshotVmRequest, ctx: Ctx, /) -> pb.SnapshotVmResponse:
        taken = await self._svc.snapshot(
            current_customer.get(),
            request.vm_id,
            request.snapshot_id,
            dict(request.metadata),
            request.warm_pool_size,
        )
        return pb.SnapshotVmResponse(
            snapshot_id=taken.snapshot.snapshot_id,
            size_bytes=taken.snapshot.size_bytes,
            state=state_to_proto(taken.vm_state),
        )

    async def list_snapshots(self, request: pb.ListSnapshotsRequest, ctx: Ctx, /) -> pb.ListSnapshotsResponse:
        page = await self._svc.list_snapshots(current_customer.get(), request.page_size, request.page_token)
        return pb.ListSnapshotsResponse(
            snapshots=[snapshot_to_proto(s) for s in page.snapshots],
            next_page_token=page.next_page_token,
            total_count=page.total_count,
        )

    async def delete_snapshot(
        self, request: pb.DeleteSnapshotRequest, ctx: Ctx, /
    ) -> pb.DeleteSnapshotResponse:
        await self._svc.delete_snapshot(current_customer.get(), request.snapshot_id)
        return pb.DeleteSnapshotResponse(success=True)

    async def exec_vm(self, request: pb.ExecVmRequest, ctx: Ctx, /) -> pb.ExecVmResponse:
        command = ExecCommand(
            argv=tuple(request.command),
            env=dict(request.env),
            stdin=request.stdin,
            working_dir=request.working_dir,
            timeout_seconds=float(request.timeout_seconds),
        )
        result = await self._svc.exec(current_customer.get(), request.vm_id, command)
        return to_message(result, pb.ExecVmResponse)

    async def write_file(self, request: pb.WriteFileRequest, ctx: Ctx, /) -> pb.WriteFileResponse:
        await self._svc.write_file(
            current_customer.get(), request.vm_id, request.path, request.content, request.mode
        )
        return pb.WriteFileResponse(success=True)

    async def read_file(self, request: pb.ReadFileRequest, ctx: Ctx, /) -> pb.ReadFileResponse:
        file = await self._svc.read_file(current_customer.get(), request.vm_id, request.path)
        return pb.ReadFileResponse(content=file.content, mode=file.mode, size_bytes=file.size_bytes)

    async def watch_vms(self, request: pb.WatchVmsRequest, ctx: Ctx, /) -> AsyncIterator[pb.VmEvent]:
        watch = self._svc.watch(
            current_customer.get(),
            [state_from_proto(s) for s in request.state_filter],
            list(request.vm_ids),
            request.after_cursor,
        )
        async for item in watch:
            event = item.event
            yield pb.VmEvent(
                cursor=item.cursor,
                vm_id=event.vm_id,
                type=pb.VmEventType(int(event.type)),
                state=state_to_proto(event.state),
                previous_state=state_to_proto(event.previous_state),
                reason=event.reason,
                at=timestamp(event.at),
            )


def snapshot_to_proto(snapshot: Snapshot) -> pb.Snapshot:
    return pb.Snapshot(
        snapshot_id=snapshot.snapshot_id,
        source_vm_id=snapshot.source_vm_id,
        config=config_to_proto(snapshot.config),
        created_at=timestamp(snapshot.created_at),
        size_bytes=snapshot.size_bytes,
        metadata=snapshot.metadata,
        warm_pool_size=snapshot.warm_pool_size,
    )


def info_to_proto(details: VmDetails) -> pb.GetVmInfoResponse:
    vm, runtime, metrics, network = details.vm, details.runtime, details.metrics, details.network
    backend_info = {"backend_type": details.backend_type}
    if runtime is not None:
        backend_info.update(
            process_id=str(runtime.pid),
            socket_path=runtime.socket_path,
            guest_ready=str(runtime.guest_ready).lower(),
            **runtime.extra,
        )
    if vm.shutdown_reason:
        backend_info["shutdown_reason"] = vm.shutdown_reason
    if vm.snapshot_id:
        backend_info["restored_from"] = vm.snapshot_id
    backend_info.update(details.backend_info)
    network_info = None
    if network is not None:
        network_info = pb.VmNetworkInfo(
            namespace=network.namespace,
            interfaces=[to_message(i, pb.NetworkInterfaceInfo) for i in network.interfaces],
        )
    return pb.GetVmInfoResponse(
        vm_id=vm.vm_id,
        config=config_to_proto(vm.config),
        state=state_to_proto(vm.state),
        metrics=to_message(metrics, pb.VmMetrics),
        backend_info=backend_info,
        network_info=network_info,
        created_at=created_timestamp(vm.created_at),
    )
