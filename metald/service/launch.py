"""From a VM record to what a backend runs: checked host paths, ordered disks, console, guest args."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import cast

from metald.domain.errors import invalid, precondition
from metald.domain.guest_args import guest_kernel_args
from metald.domain.model import Vm, VmConfig
from metald.ports import DiskSpec, LaunchSpec, NetworkAttachment
from metald.service.snapshots import Snapshots, restores


class Launch(Snapshots):
    async def _launch_spec(
        self, vm: Vm, attachment: NetworkAttachment | None, *, stored: bool = True
    ) -> LaunchSpec:
        """`stored`: the VM's paths were accepted before (boot, adoption), not a request's input."""
        config = vm.config
        assert config.boot is not None and config.cpu is not None and config.console is not None
        ordered = sorted(enumerate(config.storage), key=lambda p: (not p[1].is_root_device, p[0]))
        # Every path at once (each is a thread's work, on a boot's clock); the first in this order
        # that fails is the error reported, as when they were resolved one by one.
        boot = config.boot
        lookups: list[Awaitable[Path]] = [
            self._assets.canonical_root(),
            self._assets.resolve_kernel(boot.kernel_path, "config.boot.kernel_path", accepted=stored),
        ]
        if boot.initrd_path:
            lookups.append(self._assets.resolve(boot.initrd_path, "config.boot.initrd_path"))
        lookups += [
            self._assets.resolve(dev.path_on_host, f"config.storage[{i}].path_on_host") for i, dev in ordered
        ]
        found = await asyncio.gather(*lookups, return_exceptions=True)
        for result in found:
            if isinstance(result, BaseException):
                raise result
        paths = cast("list[Path]", found)
        root, kernel = paths[0], paths[1]
        initrd = paths[2] if boot.initrd_path else None
        disk_paths = paths[len(paths) - len(ordered) :]
        disks = [
            DiskSpec(dev.device_id, path, dev.is_read_only, dev.is_root_device)
            for (_, dev), path in zip(ordered, disk_paths, strict=True)
        ]
        return LaunchSpec(
            vm_id=vm.vm_id,
            vm_dir=self._vm_dir(vm.vm_id),
            vcpu_count=config.vcpu_count,
            memory_bytes=config.memory_bytes,
            cpu_template=config.cpu.cpu_template,
            kernel=kernel,
            initrd=initrd,
            customer_kernel_args=config.boot.kernel_args,
            guest_kernel_args=guest_kernel_args(vm.vm_id, vm.nics),
            disks=tuple(disks),
            nics=attachment.nics if attachment else (),
            netns=attachment.namespace if attachment else None,
            console_type=config.console.type,
            console_path=self._console_path(vm),
            labels={"customer_id": vm.customer_id},
            restore_from=self._snapshot_dir(vm.snapshot_id) if restores(vm.state, vm.snapshot_id) else None,
            assets_root=root,
        )

    async def _reset_clone(self, vm: Vm) -> None:
        """After a restore that did not finish: no VMM and fresh disks over the snapshot's, since
        the restored guest may have written to its own (the next boot restores the RAM again)."""
        vm_dir = self._vm_dir(vm.vm_id)
        await self._backend_call("destroy", lambda: self._backend.destroy(vm.vm_id, vm_dir))
        spec = await self._launch_spec(vm, None)
        await self._backend_call("prepare", lambda: self._backend.prepare(spec))

    def _console_path(self, vm: Vm) -> Path:
        console = vm.config.console
        return self._vm_dir(vm.vm_id) / ((console.output_file if console else "") or "console.log")

    def _check_capabilities(self, config: VmConfig) -> None:
        caps = self._backend.capabilities
        assert config.cpu is not None and config.console is not None and config.boot is not None
        template = config.cpu.cpu_template
        if template and template not in caps.cpu_templates:
            raise invalid(
                "config.cpu.cpu_template",
                f"{template} cannot be honoured by the {caps.backend_type} backend on this host",
            )
        if config.console.type not in caps.console_types:
            raise invalid(
                "config.console.type",
                f"{config.console.type} is not supported by the {caps.backend_type} backend",
            )
        if config.boot.initrd_path and not caps.supports_initrd:
            raise invalid("config.boot.initrd_path", f"the {caps.backend_type} backend cannot load an initrd")
        if config.vcpu_count > caps.max_vcpus:
            raise invalid("config.cpu.vcpu_count", f"at most {caps.max_vcpus} on this backend")
        if config.network and self._network is None:
            raise precondition(
                "NETWORK_DISABLED", "networking is disabled on this host (network_enabled=false)"
            )
