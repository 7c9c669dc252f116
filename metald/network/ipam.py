"""Persistent address management on AddressBook.claim_address (unique per pool and address).

Each customer gets a network index i while it has VMs with NICs: the i-th /24 of the IPv4 pool,
the i-th /64 of the IPv6 pool and bridge mb_<i>. When its last such VM is released, everything
the customer owns (index, host-side addresses and networks) is released too and the index goes
back to the pool. Guest addresses, explicit host-side addresses and
MACs are claimed in per-customer pools; explicit host-side networks in host-wide pools, since
all bridges share one routing table.

Pools (rows are (pool, address, owner)):
  netindex            i              customer:<c>   host-wide uniqueness of the index
  net@<c>             i              customer:<c>   the customer's index, for lookup
  ipv4@<c> ipv6@<c>   address        <vm id>        guest addresses (auto and explicit)
                                     customer:<c>   explicit host-side addresses of the customer
  gw@<c>              address        customer:<c>   ...recorded for lookup
  hostnet             network        customer:<c>   explicit host-side networks, host-wide
  hostnet@<c>         network        customer:<c>   ...recorded for lookup
  mac@<c>             MAC            <vm id>        MACs on the customer's bridge
  netid               id8            <vm id>        device names of the VM
  member@<c>          vm id          <vm id>        VMs planned on the customer's network

The store only answers "which addresses are used in this pool", not who owns one, so anything a
customer (rather than a VM) owns is claimed host-wide first and then recorded in the customer's
lookup pool: a crash in between can only leak a claim, never hand one out twice. A customer's
network is in use while member@<c> or mac@<c> (VMs planned before member@ existed) is not empty;
membership is claimed and the last member's release done under one lock, so a plan never gets a
network that is being freed.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from metald.domain.errors import MetaldError, exhausted, precondition
from metald.network.names import customer_bridge
from metald.ports import AddressBook

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SUBNET_PREFIX = {4: 24, 6: 64}


@dataclass(frozen=True)
class CustomerNetwork:
    customer_id: str
    index: int
    subnet4: ipaddress.IPv4Network
    subnet6: ipaddress.IPv6Network

    @property
    def bridge(self) -> str:
        return customer_bridge(self.index)

    def subnet(self, version: int) -> IPNetwork:
        return self.subnet4 if version == 4 else self.subnet6

    def gateway(self, version: int) -> IPAddress:
        """The bridge's default address: .1 / ::1 of the subnet."""
        return self.subnet(version).network_address + 1

    def reserved(self, address: IPAddress) -> bool:
        """Addresses no guest may have: network, gateway and (v4) broadcast."""
        subnet = self.subnet(address.version)
        return address in (subnet.network_address, self.gateway(address.version), subnet.broadcast_address)


def owner_of_customer(customer_id: str) -> str:
    return f"customer:{customer_id}"


class Ipam:
    def __init__(self, addresses: AddressBook, ipv4_pool: str, ipv6_pool: str) -> None:
        try:
            self.pool4 = ipaddress.IPv4Network(ipv4_pool)
            self.pool6 = ipaddress.IPv6Network(ipv6_pool)
        except ValueError as exc:
            raise _config_error(f"bad address pool: {exc}") from exc
        if self.pool4.prefixlen > SUBNET_PREFIX[4] or self.pool6.prefixlen > SUBNET_PREFIX[6]:
            raise _config_error("the IPv4 pool must be /24 or larger and the IPv6 pool /64 or larger")
        self._store = addresses
        self._count: int = min(
            2 ** (SUBNET_PREFIX[4] - self.pool4.prefixlen), 2 ** (SUBNET_PREFIX[6] - self.pool6.prefixlen)
        )
        self._networks: dict[str, CustomerNetwork] = {}
        self._host_wide = asyncio.Lock()  # network indexes and host-side networks
        self._pool_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def pool(self, version: int) -> IPNetwork:
        return self.pool4 if version == 4 else self.pool6

    # ---- customer networks ----

    async def customer_network(self, customer_id: str, vm_id: str = "") -> CustomerNetwork:
        """The customer's network, claimed on first use. Planning a VM passes its vm_id: the VM
        becomes a member and the network stays the customer's until its last member is released."""
        if not vm_id and (net := self._networks.get(customer_id)):
            return net
        async with self._host_wide:
            if vm_id:
                await self._store.claim_address(f"member@{customer_id}", vm_id, vm_id)
            return await self._network_of(customer_id)

    async def _network_of(self, customer_id: str) -> CustomerNetwork:
        if net := self._networks.get(customer_id):
            return net
        owner = owner_of_customer(customer_id)
        mine = await self._store.used_addresses(f"net@{customer_id}")
        index = min((int(i) for i in mine), default=None)
        if index is None:
            index = await self._claim_index(customer_id, owner)
            await self._store.claim_address(f"net@{customer_id}", str(index), owner)
        net = CustomerNetwork(
            customer_id,
            index,
            ipaddress.IPv4Network((int(self.pool4.network_address) + (index << 8), SUBNET_PREFIX[4])),
            ipaddress.IPv6Network((int(self.pool6.network_address) + (index << 64), SUBNET_PREFIX[6])),
        )
        self._networks[customer_id] = net
        return net

    async def _claim_index(self, customer_id: str, owner: str) -> int:
        taken = await self._store.used_addresses("netindex")
        # Start where the customer id hashes to, so customers tend to keep their subnet across hosts.
        start = int.from_bytes(hashlib.sha256(customer_id.encode()).digest()[:4], "big") % self._count
        for step in range(self._count):
            index = (start + step) % self._count
            if str(index) not in taken and await self._store.claim_address("netindex", str(index), owner):
                return index
        raise exhausted("NETWORK_POOL_EXHAUSTED", f"no customer network left in {self.pool4} / {self.pool6}")

    # ---- guest addresses ----

    async def claim_next(self, net: CustomerNetwork, version: int, vm_id: str) -> IPAddress:
        """The lowest free guest address of the customer's subnet, claimed for vm_id."""
        pool = f"ipv{version}@{net.customer_id}"
        async with self._pool_locks[pool]:
            used = await self._store.used_addresses(pool)
            for address in _hosts(net.subnet(version)):
                if net.reserved(address) or str(address) in used:
                    continue
                if await self._store.claim_address(pool, str(address), vm_id):
                    return address
        raise exhausted(
            "NETWORK_POOL_EXHAUSTED", f"no free IPv{version} address left in {net.subnet(version)}"
        )

    async def claim_address(self, customer_id: str, address: IPAddress, owner: str) -> bool:
        return await self._store.claim_address(f"ipv{address.version}@{customer_id}", str(address), owner)

    async def claim_host_address(self, customer_id: str, address: IPAddress) -> bool:
        """An explicit host-side (gateway) address of the customer; True if it is (now) theirs."""
        owner = owner_of_customer(customer_id)
        if await self.claim_address(customer_id, address, owner):
            await self._store.claim_address(f"gw@{customer_id}", str(address), owner)
            return True
        return str(address) in await self._store.used_addresses(f"gw@{customer_id}")

    async def claim_host_network(self, customer_id: str, network: IPNetwork) -> IPNetwork | None:
        """Claim a host-side network outside the pools; returns another customer's overlapping
        network if there is one (then nothing is claimed)."""
        owner = owner_of_customer(customer_id)
        async with self._host_wide:
            mine = await self._store.used_addresses(f"hostnet@{customer_id}")
            if str(network) in mine:
                return None
            for text in await self._store.used_addresses("hostnet"):
                other = ipaddress.ip_network(text)
                if text not in mine and other.version == network.version and other.overlaps(network):
                    return other
            if not await self._store.claim_address("hostnet", str(network), owner):
                return network  # taken by someone who has not recorded it (yet)
            await self._store.claim_address(f"hostnet@{customer_id}", str(network), owner)
            return None

    # ---- MACs and device names ----

    async def claim_mac(self, customer_id: str, mac: str, vm_id: str) -> bool:
        return await self._store.claim_address(f"mac@{customer_id}", mac, vm_id)

    async def claim_netid(self, id8: str, vm_id: str) -> bool:
        return await self._store.claim_address("netid", id8, vm_id)

    async def release(self, vm_id: str, customer_id: str) -> str:
        """Free everything the VM holds (addresses, MACs, device names) and, if it was the
        customer's last VM on its network, what the customer holds (index, host-side
        addresses and networks). Returns the bridge of a network so freed, else "". Idempotent."""
        async with self._host_wide:
            await self._store.release_addresses(vm_id)
            for pool in (f"member@{customer_id}", f"mac@{customer_id}"):
                if await self._store.used_addresses(pool):
                    return ""
            indexes = await self._store.used_addresses(f"net@{customer_id}")
            await self._store.release_addresses(owner_of_customer(customer_id))
            self._networks.pop(customer_id, None)
            return customer_bridge(min(int(i) for i in indexes)) if indexes else ""


def _hosts(subnet: IPNetwork) -> Iterator[IPAddress]:
    """Addresses of a subnet in order, lazily (a /64 is not a list)."""
    base = subnet.network_address
    for offset in range(1, subnet.num_addresses):
        yield base + offset


def _config_error(message: str) -> MetaldError:
    return precondition("NETWORK_CONFIG_INVALID", message)
