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

from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.model import NicAddress, Vm
from metald.network import ip, names, plumbing, walls
from metald.network.ipam import CustomerNetwork, Ipam
from metald.network.netlink import LinkReader
from metald.network.plan import host_interface, plan_vm
from metald.ports import CheckResult, InterfaceInfo, NetworkAttachment, NicSpec, TrafficCounters, VmStore

log = logging.getLogger(__name__)


class LinuxNetwork:
    def __init__(
        self,
        store: VmStore,
        *,
        host_netns: str,
        ipv4_pool: str,
        ipv6_pool: str,
        allow_egress: bool,
        blocked_ports: Collection[int] = (),
        walls_check_seconds: float = 10.0,
    ) -> None:
        """host_netns "" is the root namespace; any other name is metald's own, created on first
        use. blocked_ports (the API's) are refused to guests even on their gateway address. The
        nftables walls are checked (and restored if missing or altered) every walls_check_seconds."""
        if allow_egress:
            raise MetaldError(
                ErrorCode.FAILED_PRECONDITION,
                "network_allow_egress: routing/NAT guests to the outside is not implemented",
                reason="NETWORK_EGRESS_UNSUPPORTED",
            )
        self._ipam = Ipam(store, ipv4_pool, ipv6_pool)
        self._host = host_netns
        self._blocked = tuple(blocked_ports)
        self._host_ready = False
        self._host_lock = asyncio.Lock()
        self._walls_lock = asyncio.Lock()
        self._bridge_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._links = LinkReader()
        self._walls_period = walls_check_seconds
        self._walls_tasks: dict[str, asyncio.Task[None]] = {}

    # ---- addresses ----

    async def plan(self, vm: Vm) -> tuple[NicAddress, ...]:
        return await plan_vm(self._ipam, vm)

    async def release(self, vm: Vm) -> None:
        await self._ipam.release(vm.vm_id)

    # ---- devices ----

    async def attach(self, vm: Vm) -> NetworkAttachment:
        """Create (or complete) the VM's devices; on failure nothing of the VM is left behind."""
        if not vm.config.network:
            return NetworkAttachment("", (), ())
        if not _planned(vm):
            raise MetaldError(
                ErrorCode.FAILED_PRECONDITION,
                f"VM {vm.vm_id} has no network plan",
                reason="NETWORK_NOT_PLANNED",
            )
        started = time.monotonic()
        nics = plumbing.nic_links(vm)
        try:
            net = await self._ipam.customer_network(vm.customer_id)
            await self._ensure_host()
            await self._ensure_bridge(net, vm)
            await plumbing.ensure_vm(self._host, names.vm_netns(vm.vm_id), net.bridge, nics)
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
        await plumbing.remove_vm(self._host, names.vm_netns(vm.vm_id), veths)
        log.info(
            "network detached in %.0f ms", (time.monotonic() - started) * 1000, extra={"vm_id": vm.vm_id}
        )

    async def describe(self, vm: Vm) -> NetworkAttachment | None:
        """The VM's NICs whose TAP exists, with the guest's counters (host tap tx = guest rx),
        from one netlink dump of the VM's namespace; None if the namespace is gone."""
        if not _planned(vm):
            return None
        links = await self._links.links(names.vm_netns(vm.vm_id))
        if links is None:
            return None
        taps = {link.name: link for link in links}
        nics = [nic for nic in plumbing.nic_links(vm) if nic.tap in taps]
        counters = TrafficCounters(
            sum(taps[nic.tap].tx_bytes for nic in nics), sum(taps[nic.tap].rx_bytes for nic in nics)
        )
        return dataclasses.replace(self._attachment(vm, nics), counters=counters)

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
            self._keep_walls()
        for netns in await ip.netns_names():
            owner = names.netns_id8(netns)
            if owner and owner not in live and await plumbing.belongs_to(self._host, netns):
                removed += await plumbing.remove_vm(self._host, netns, ())
        return removed

    async def ping(self) -> CheckResult:
        started = time.monotonic()
        try:
            status, detail = await self._health()
        except MetaldError as exc:
            status, detail = "unhealthy", exc.message
        return CheckResult(status, detail, (time.monotonic() - started) * 1000)

    # ---- internals ----

    async def _health(self) -> tuple[str, str]:
        where = f"host namespace {self._host or '(root)'}"
        if not ip.netns_exists(self._host):
            return "healthy", f"{where} not created yet (the first BootVm with a NIC creates it)"
        bridges = await self._bridges()
        if bridges and not await self._walls_intact(bridges):
            self._restore_walls_now()
            return "degraded", f"{where}: nftables table inet {walls.TABLE} is missing or altered; restoring"
        return "healthy", f"{where}: {len(bridges)} customer bridge(s)"

    def _keep_walls(self) -> None:
        """Start the periodic check of the walls (once; it runs until the daemon ends)."""
        if "periodic" not in self._walls_tasks:
            self._walls_tasks["periodic"] = asyncio.create_task(self._check_walls_forever())

    def _restore_walls_now(self) -> None:
        if "now" not in self._walls_tasks:
            task = asyncio.create_task(self._check_walls())
            self._walls_tasks["now"] = task
            task.add_done_callback(lambda _: self._walls_tasks.pop("now", None))

    async def _check_walls_forever(self) -> None:
        while True:
            await asyncio.sleep(self._walls_period)
            try:
                await self._check_walls()
            except MetaldError as exc:
                log.warning("checking the nftables walls failed: %s", exc.message)

    async def _check_walls(self) -> None:
        """Put the walls back if they are missing or were altered while VMs run."""
        if not ip.netns_exists(self._host):
            return
        async with self._walls_lock:
            bridges = await self._bridges()
            if not bridges or await self._walls_intact(bridges):
                return
            log.warning("nftables walls in %s missing or altered: restoring", self._host or "(root)")
            await walls.apply(self._host, bridges, self._blocked)

    async def _walls_intact(self, bridges: list[str]) -> bool:
        expected = walls.rule_count(walls.ruleset(bridges, self._blocked))
        return await walls.installed_rules(self._host) == expected

    async def _ensure_host(self) -> None:
        async with self._host_lock:
            if self._host_ready and ip.netns_exists(self._host):
                return
            if not ip.netns_exists(self._host):
                await ip.check("ip", "netns", "add", self._host)
            if self._host:
                await ip.check(*ip.ip(self._host, "link", "set", "lo", "up"))
                await walls.seal_own_namespace(self._host)
            await self._apply_walls()
            self._host_ready = True
        self._keep_walls()

    async def _ensure_bridge(self, net: CustomerNetwork, vm: Vm) -> None:
        addresses = [f"{net.gateway(v)}/{net.subnet(v).prefixlen}" for v in (4, 6)]
        for nic in vm.config.network:
            addresses += [str(i) for v in (4, 6) if (i := host_interface(nic, v)) is not None]
        async with self._bridge_locks[net.bridge]:
            created = await plumbing.ensure_bridge(self._host, net.bridge, addresses)
        if created:
            await self._apply_walls()

    async def _apply_walls(self) -> None:
        async with self._walls_lock:  # list and apply together, so the last apply sees every bridge
            await walls.apply(self._host, await self._bridges(), self._blocked)

    async def _bridges(self) -> list[str]:
        return [
            str(link["ifname"])
            for link in await ip.links(self._host)
            if str(link["ifname"]).startswith(names.CUSTOMER_BRIDGE_PREFIX)
        ]

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
