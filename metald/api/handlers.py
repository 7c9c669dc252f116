"""vmprovisioner.v1.VmService over the service's use cases: translation only, no decisions."""

from __future__ import annotations

from typing import Any

from connectrpc.request import RequestContext

from metald.api.convert import config_from_proto, config_to_proto, state_from_proto, state_to_proto, timestamp
from metald.api.interceptor import current_customer
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.gen.vmprovisioner.v1.vm_connect import VmService as VmServiceProtocol
from metald.usecases import VmDetails, VmUseCases

Ctx = RequestContext[Any, Any]


class VmServiceHandler(VmServiceProtocol):
    def __init__(self, service: VmUseCases) -> None:
        self._svc = service

    async def create_vm(self, request: pb.CreateVmRequest, ctx: Ctx, /) -> pb.CreateVmResponse:
        vm = await self._svc.create(
            current_customer.get(), request.vm_id, config_from_proto(request.config), request.customer_id
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
                    created_at=timestamp(vm.created_at),
                )
                for vm in page.vms
            ],
            next_page_token=page.next_page_token,
            total_count=page.total_count,
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
    backend_info.update(details.backend_info)
    network_info = None
    if network is not None:
        network_info = pb.VmNetworkInfo(
            namespace=network.namespace,
            interfaces=[
                pb.NetworkInterfaceInfo(
                    interface_id=i.interface_id,
                    tap_device=i.tap_device,
                    guest_mac=i.guest_mac,
                    host_device_name=i.host_device_name,
                    guest_ipv4=i.guest_ipv4,
                    guest_ipv6=i.guest_ipv6,
                )
                for i in network.interfaces
            ],
        )
    return pb.GetVmInfoResponse(
        vm_id=vm.vm_id,
        config=config_to_proto(vm.config),
        state=state_to_proto(vm.state),
        metrics=pb.VmMetrics(
            cpu_time_nanos=metrics.cpu_time_nanos,
            memory_usage_bytes=metrics.memory_usage_bytes,
            disk_read_bytes=metrics.disk_read_bytes,
            disk_write_bytes=metrics.disk_write_bytes,
            network_rx_bytes=metrics.network_rx_bytes,
            network_tx_bytes=metrics.network_tx_bytes,
        ),
        backend_info=backend_info,
        network_info=network_info,
        created_at=timestamp(vm.created_at),
    )
