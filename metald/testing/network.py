"""A Network (metald/ports.py) in memory: addresses from a small pool, "namespaces" as records.

Like the real one, the host side exists only after the first attach; `host_reboot` forgets every
VM's devices. Failures are injected per operation through `faults`.
"""

from __future__ import annotations

import dataclasses

from metald.domain.model import NicAddress, Vm
from metald.ports import CheckResult, InterfaceInfo, NetworkAttachment, NicSpec, TrafficCounters
from metald.testing.faults import Faults


class FakeNetwork:
    def __init__(self) -> None:
        self.faults = Faults()
        self.planned: dict[str, tuple[NicAddress, ...]] = {}
        self.attached: dict[str, NetworkAttachment] = {}
        self.host_ready = False
        self.counters_by_vm: dict[str, tuple[int, int]] = {}
        self.held: dict[str, int] = {}  # holder -> TAPs it holds
        self._next_host = 2

    def host_reboot(self) -> None:
        self.attached.clear()
        self.host_ready = False

    async def plan(self, vm: Vm) -> tuple[NicAddress, ...]:
        await self.faults.step("plan")
        nics = []
        for nic in vm.config.network:
            host = self._next_host
            self._next_host += 1
            mac = f"02:00:00:00:{host // 256:02x}:{host % 256:02x}"
            nics.append(NicAddress(nic.interface_id, mac, f"10.9.{host // 256}.{host % 256}/16", "10.9.0.1"))
        self.planned[vm.vm_id] = tuple(nics)
        return tuple(nics)

    async def release(self, vm: Vm) -> None:
        await self.faults.step("release")
        self.planned.pop(vm.vm_id, None)

    async def attach(self, vm: Vm) -> NetworkAttachment:
        await self.faults.step("attach")
        self.host_ready = True
        specs = tuple(NicSpec(n.interface_id, f"tap{i}", n.mac) for i, n in enumerate(vm.nics))
        infos = tuple(
            InterfaceInfo(n.interface_id, f"tap{i}", n.mac, f"vh_{vm.vm_id[:8]}_{i}", n.guest_ipv4)
            for i, n in enumerate(vm.nics)
        )
        attachment = self.attached[vm.vm_id] = NetworkAttachment(f"ns_{vm.vm_id}", specs, infos)
        return attachment

    async def detach(self, vm: Vm) -> None:
        await self.faults.step("detach")
        self.attached.pop(vm.vm_id, None)

    async def describe(self, vm: Vm) -> NetworkAttachment | None:
        """What is attached, with the counters a test set (one read, like the real one)."""
        await self.faults.step("describe")
        attachment = self.attached.get(vm.vm_id)
        if attachment is None:
            return None
        rx, tx = self.counters_by_vm.get(vm.vm_id, (0, 0))
        return dataclasses.replace(attachment, counters=TrafficCounters(rx, tx))

    async def remove_orphans(self, live_vm_ids: set[str]) -> list[str]:
        await self.faults.step("remove_orphans")
        stale = [vm_id for vm_id in self.attached if vm_id not in live_vm_ids]
        for vm_id in stale:
            del self.attached[vm_id]
        return [f"ns_{vm_id}" for vm_id in stale]

    async def hold(self, holder: str, count: int) -> NetworkAttachment:
        await self.faults.step("hold")
        self.held[holder] = count
        specs = tuple(NicSpec(f"held{i}", f"held{i}", f"02:00:00:00:ff:{i:02x}") for i in range(count))
        return NetworkAttachment(f"ns_held_{holder}", specs, ())

    async def take_held(self, vm: Vm, holder: str) -> bool:
        await self.faults.step("take_held")
        return self.held.pop(holder, -1) == len(vm.config.network)

    async def unhold(self, holder: str | None) -> None:
        await self.faults.step("unhold")
        if holder is None:
            self.held.clear()
        else:
            self.held.pop(holder, None)

    async def ping(self) -> CheckResult:
        return CheckResult("healthy", "fake network")
