"""LinuxNetwork: metald.ports.Network on network namespaces, bridges, veths, TAPs, tc and nftables.

The host namespace holds one bridge per customer (its gateways) behind the walls of walls.py;
each VM gets a namespace of its own (plumbing.py) where QEMU runs and opens its TAPs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Collection, Sequence

from metald.domain.errors import MetaldError, precondition
from metald.domain.model import NicAddress, Vm
from metald.network import egress, ip, names, plumbing, sourceguard, walls
from metald.network.ipam import CustomerNetwork, Ipam
from metald.network.keeper import WallKeeper
from metald.network.mac import derive_mac
from metald.network.netlink import LinkReader
from metald.network.plan import host_interface, plan_vm
from metald.ports import AddressBook, CheckResult, InterfaceInfo, NetworkAttachment, NicSpec, TrafficCounters

log = logging.getLogger(__name__)


class LinuxNetwork:
    def __init__(
        self,
        addresses: AddressBook,
        *,
        host_netns: str,
        ipv4_pool: str,
        ipv6_pool: str,
        allow_egress: bool,
        blocked_ports: Collection[int] = (),
        walls_check_seconds: float = 10.0,
        egress_uplink: str = "",
    ) -> None:
        """host_netns "" is the root namespace; any other name is metald's own, created on first
        use. blocked_ports (the API's) are refused to guests even on their gateway address. The
        nftables walls are checked (and restored if missing or altered) every walls_check_seconds.
        With allow_egress, interfaces' egress policies are opened toward egress_uplink, an
        interface in the host namespace that the operator provides (egress.py)."""
        if allow_egress and not egress_uplink:
            raise precondition(
                "NETWORK_CONFIG_INVALID",
                "network_allow_egress needs network_egress_uplink (an interface in the host namespace)",
            )
        self._ipam = Ipam(addresses, ipv4_pool, ipv6_pool)
        self._host = host_netns
        self._host_ready = False
        self._host_lock = asyncio.Lock()
        self._bridge_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._links = LinkReader()
        self._walls = WallKeeper(
            host_netns, blocked_ports, egress_uplink if allow_egress else "", walls_check_seconds
        )

    # ---- addresses ----

    async def plan(self, vm: Vm) -> tuple[NicAddress, ...]:
        egress.check_policies(vm.config.network, available=bool(self._walls.uplink))
        return await plan_vm(self._ipam, vm)

    async def release(self, vm: Vm) -> None:
        freed = await self._ipam.release(vm.vm_id, vm.customer_id)
        if freed and ip.netns_exists(self._host):
            # The next customer of this index must not inherit the old host-side addresses.
            async with self._bridge_locks[freed]:
                links = await ip.links(self._host)
                if not any(link.get("master") == freed for link in links):
                    await plumbing.delete_links(self._host, [freed])

    # ---- devices ----

    async def attach(self, vm: Vm) -> NetworkAttachment:
        """Create (or complete) the VM's devices; on failure nothing of the VM is left behind."""
        if not vm.config.network:
            return NetworkAttachment("", (), ())
        if not _planned(vm):
            raise precondition("NETWORK_NOT_PLANNED", f"VM {vm.vm_id} has no network plan")
        started = time.monotonic()
        nics = plumbing.nic_links(vm)
        try:
            net = await self._ipam.customer_network(vm.customer_id)
            await self._ensure_host()
            await self._ensure_bridge(net, vm)
            await plumbing.ensure_vm(self._host, names.vm_netns(vm.vm_id), net.bridge, nics)
            if self._walls.uplink:
                await sourceguard.apply(names.vm_netns(vm.vm_id), _sources(vm, nics))
                rules = egress.vm_rules(names.id8(vm.vm_id), net.bridge, vm.config.network, vm.nics)
                if self._walls.open_for(vm.vm_id, rules):
                    await self._walls.apply()
        except BaseException:
            await asyncio.shield(self._detach_quietly(vm))
            raise
        log.info(
            "network attached in %.0f ms", (time.monotonic() - started) * 1000, extra={"vm_id": vm.vm_id}
        )
        return self._attachment(vm, nics)

    async def detach(self, vm: Vm) -> None:
        started = time.monotonic()
        veths = [names.host_veth(vm.vm_id, i) for i in range(len(vm.config.network))]
        try:
            await plumbing.remove_vm(self._host, names.vm_netns(vm.vm_id), veths)
        finally:
            self._links.forget(names.vm_netns(vm.vm_id))  # after: frees the namespace (netlink.py)
        if self._walls.close_for(vm.vm_id) and ip.netns_exists(self._host):
            await self._walls.apply()
        log.info(
            "network detached in %.0f ms", (time.monotonic() - started) * 1000, extra={"vm_id": vm.vm_id}
        )

    async def describe(self, vm: Vm) -> NetworkAttachment | None:
        """The VM's NICs whose TAP exists, with the guest's counters (host tap tx = guest rx),
        from one netlink dump of the VM's namespace; None if the namespace is gone."""
        if not _planned(vm):
            return None
        planned = plumbing.nic_links(vm)
        links = await self._links.links(names.vm_netns(vm.vm_id), frozenset(nic.tap for nic in planned))
        if links is None:
            return None
        taps = {link.name: link for link in links}
        nics = [nic for nic in planned if nic.tap in taps]
        counters = TrafficCounters(
            sum(taps[nic.tap].tx_bytes for nic in nics), sum(taps[nic.tap].rx_bytes for nic in nics)
        )
        return dataclasses.replace(self._attachment(vm, nics), counters=counters)

    # ---- TAPs held for a VMM started before its VM (a warm pool slot) ----

    async def hold(self, holder: str, count: int) -> NetworkAttachment:
        netns = names.holder_netns(holder)
        taps = [names.held_tap(i) for i in range(count)]
        try:
            await plumbing.ensure_holder(self._host, netns, taps)
        except BaseException:
            await asyncio.shield(self.unhold(holder))
            raise
        # The guest's MAC comes from the restored device state, then the agent sets the VM's own.
        nics = tuple(NicSpec(tap, tap, derive_mac(holder, tap)) for tap in taps)
        return NetworkAttachment(netns, nics, ())

    async def take_held(self, vm: Vm, holder: str) -> bool:
        renames = [(names.held_tap(nic.index), nic.tap) for nic in plumbing.nic_links(vm)]
        return await plumbing.adopt_holder(names.holder_netns(holder), names.vm_netns(vm.vm_id), renames)

    async def unhold(self, holder: str | None) -> None:
        if holder is not None:
            await plumbing.remove_vm(self._host, names.holder_netns(holder), ())
            return
        for netns in await ip.netns_names():
            if netns.startswith(names.HOLDER_NETNS_PREFIX) and await plumbing.belongs_to(self._host, netns):
                await plumbing.remove_vm(self._host, netns, ())

    async def remove_orphans(self, live_vm_ids: set[str]) -> list[str]:
        """Remove VM namespaces (made for this host namespace) and host veths of VMs not alive."""
        live = {names.id8(vm_id) for vm_id in live_vm_ids}
        removed: list[str] = []
        if ip.netns_exists(self._host):
            stale = [
                str(link["ifname"])
                for link in await ip.links(self._host)
                if (owner := names.host_veth_id8(str(link["ifname"]))) and owner not in live
            ]
            removed += await plumbing.delete_links(self._host, stale)
            await self._reopen_egress(live_vm_ids)
            self._walls.keep()
        for netns in await ip.netns_names():
            owner = names.netns_id8(netns)
            if owner and owner not in live and await plumbing.belongs_to(self._host, netns):
                removed += await plumbing.remove_vm(self._host, netns, ())
                self._links.forget(netns)
        return removed

    async def ping(self) -> CheckResult:
        try:
            status, detail = await self._health()
        except MetaldError as exc:
            status, detail = "unhealthy", exc.message
        return CheckResult(status, detail)

    # ---- internals ----

    async def _health(self) -> tuple[str, str]:
        where = f"host namespace {self._host or '(root)'}"
        if not ip.netns_exists(self._host):
            return "healthy", f"{where} not created yet (the first BootVm with a NIC creates it)"
        return await self._walls.health(where)

    async def _reopen_egress(self, live_vm_ids: set[str]) -> None:
        """After a restart: the running VMs keep their egress rules (tagged with their id8)."""
        if self._walls.uplink:
            await self._walls.take_over({names.id8(vm_id): vm_id for vm_id in live_vm_ids})

    async def _ensure_host(self) -> None:
        async with self._host_lock:
            if self._host_ready and ip.netns_exists(self._host):
                return
            if not ip.netns_exists(self._host):
                await ip.check("ip", "netns", "add", self._host)
            if self._host:
                await ip.check(*ip.ip(self._host, "link", "set", "lo", "up"))
                await walls.seal_own_namespace(self._host, egress=bool(self._walls.uplink))
            await self._walls.apply()
            self._host_ready = True
        self._walls.keep()

    async def _ensure_bridge(self, net: CustomerNetwork, vm: Vm) -> None:
        addresses = [f"{net.gateway(v)}/{net.subnet(v).prefixlen}" for v in (4, 6)]
        for nic in vm.config.network:
            addresses += [str(i) for v in (4, 6) if (i := host_interface(nic, v)) is not None]
        async with self._bridge_locks[net.bridge]:
            created = await plumbing.ensure_bridge(
                self._host, net.bridge, addresses, egress=bool(self._walls.uplink)
            )
        if created:
            await self._walls.apply()

    async def _detach_quietly(self, vm: Vm) -> None:
        try:
            await self.detach(vm)
        except MetaldError as exc:
            log.warning("network clean-up after a failed attach failed: %s", exc.message)

    def _attachment(self, vm: Vm, nics: Sequence[plumbing.NicLinks]) -> NetworkAttachment:
        specs, infos = [], []
        for nic in nics:
            address = vm.nics[nic.index]
            specs.append(NicSpec(address.interface_id, nic.tap, address.mac, nic.rate_limit))
            infos.append(
                InterfaceInfo(
                    address.interface_id,
                    nic.tap,
                    address.mac,
                    nic.host_veth,
                    address.guest_ipv4,
                    address.guest_ipv6,
                )
            )
        return NetworkAttachment(names.vm_netns(vm.vm_id), tuple(specs), tuple(infos))


def _planned(vm: Vm) -> bool:
    return bool(vm.config.network) and len(vm.nics) == len(vm.config.network)


def _sources(vm: Vm, nics: Sequence[plumbing.NicLinks]) -> list[sourceguard.GuestSource]:
    return [
        sourceguard.GuestSource(
            nic.tap, address.mac, address.guest_ipv4.split("/")[0], address.guest_ipv6.split("/")[0]
        )
        for nic, address in zip(nics, vm.nics, strict=True)
    ]
