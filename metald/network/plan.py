"""CreateVm's half of networking: settle each interface's MAC and addresses (persistently).

Per interface and address family:
- neither guest_ipv4 nor guest_ipv6 given: dual stack from the customer's subnets, gateway .1/::1;
- an explicit guest address: honoured and claimed (a taken one is ALREADY_EXISTS naming the
  field); only the given families are configured. Its gateway is guest_*.gateway if set, else
  host_*.address, else the customer's gateway when the address lies in the customer's subnet.
- an explicit host_* address is the bridge side of that network: attach() puts it on the
  customer bridge (with the guest's prefix unless host_*.prefix_length says otherwise). It must
  share the guest's network and lie in the customer's subnet or wholly outside metald's pools
  and every other customer's host-side networks, since all bridges share one routing table.
  host_*.gateway has no meaning here (the host side is the gateway) and is ignored.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from metald.domain.errors import MetaldError, conflict, internal, invalid
from metald.domain.model import IpConfig, NetworkInterface, NicAddress, Vm
from metald.domain.validation import check_mac, check_rate_limit
from metald.network import mac as macs
from metald.network.ipam import CustomerNetwork, IPAddress, Ipam, IPNetwork
from metald.network.names import MAX_NICS, id8

NIC_TYPES = ("TAP", "")
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
_AUTO_MAC_ATTEMPTS = 8


@dataclass(frozen=True)
class FamilyPlan:
    address: str = ""  # "addr/prefix"
    gateway: str = ""


def given(config: IpConfig | None) -> bool:
    return config is not None and config.address != ""


def host_interface(nic: NetworkInterface, version: int) -> IPInterface | None:
    """The bridge-side address/prefix an interface asks for (prefix defaults to the guest's)."""
    host, guest = _configs(nic, version)
    if host is None or not given(host):
        return None
    prefix = host.prefix_length or (guest.prefix_length if guest else 0) or (32 if version == 4 else 128)
    return ipaddress.ip_interface(f"{host.address}/{prefix}")


async def plan_vm(ipam: Ipam, vm: Vm) -> tuple[NicAddress, ...]:
    """Claims for every interface of the VM; on any refusal everything claimed is given back."""
    nics = vm.config.network
    if not nics:
        return ()
    if len(nics) > MAX_NICS:
        raise invalid("config.network", f"at most {MAX_NICS} interfaces")
    for i, nic in enumerate(nics):
        if nic.type not in NIC_TYPES:
            raise invalid(f"config.network[{i}].type", f"unsupported type {nic.type!r}; only TAP is offered")
        if nic.rate_limit is not None:
            check_rate_limit(nic.rate_limit, f"config.network[{i}].rate_limit")
    if not await ipam.claim_netid(id8(vm.vm_id), vm.vm_id):
        raise conflict(
            "NETWORK_NAME_COLLISION",
            f"VM {vm.vm_id} already holds network resources, or its device names collide with another VM's",
            vm_id=vm.vm_id,
        )
    try:
        net = await ipam.customer_network(vm.customer_id, vm.vm_id)
        return tuple([await _plan_nic(ipam, net, vm, i, nic) for i, nic in enumerate(nics)])
    except BaseException:
        await ipam.release(vm.vm_id, vm.customer_id)
        raise


async def _plan_nic(ipam: Ipam, net: CustomerNetwork, vm: Vm, i: int, nic: NetworkInterface) -> NicAddress:
    field = f"config.network[{i}]"
    mac = await _plan_mac(ipam, vm, nic, f"{field}.guest_mac")
    auto = not given(nic.guest_ipv4) and not given(nic.guest_ipv6)
    v4 = await _plan_family(ipam, net, vm.vm_id, nic, 4, field, auto)
    v6 = await _plan_family(ipam, net, vm.vm_id, nic, 6, field, auto)
    return NicAddress(nic.interface_id, mac, v4.address, v4.gateway, v6.address, v6.gateway)


async def _plan_mac(ipam: Ipam, vm: Vm, nic: NetworkInterface, field: str) -> str:
    if nic.guest_mac.strip().lower() in macs.AUTO:
        for attempt in range(_AUTO_MAC_ATTEMPTS):
            mac = macs.derive_mac(vm.vm_id, nic.interface_id, attempt)
            if await ipam.claim_mac(vm.customer_id, mac, vm.vm_id):
                return mac
        raise internal("MAC_EXHAUSTED", "could not derive a free MAC")
    mac = check_mac(nic.guest_mac, field)
    if not await ipam.claim_mac(vm.customer_id, mac, vm.vm_id):
        raise _taken(field, f"MAC {mac} is already used on this customer's network")
    return mac


async def _plan_family(
    ipam: Ipam, net: CustomerNetwork, vm_id: str, nic: NetworkInterface, version: int, field: str, auto: bool
) -> FamilyPlan:
    host_field, guest_field = f"{field}.host_ipv{version}", f"{field}.guest_ipv{version}"
    host_config, guest = _configs(nic, version)
    if given(host_config) and (auto or not given(guest)):
        raise invalid(host_field, f"needs guest_ipv{version} as well")
    if auto:
        address = await ipam.claim_next(net, version, vm_id)
        return FamilyPlan(f"{address}/{net.subnet(version).prefixlen}", str(net.gateway(version)))
    if guest is None or not given(guest):
        return FamilyPlan()
    host = _host_interface(nic, version, host_field)
    interface = _guest_interface(ipam, net, guest, version, guest_field, host)
    gateway = await _claim_host_side(ipam, net, host, interface, host_field)
    if guest.gateway:
        gateway = _parse(guest.gateway, version, f"{guest_field}.gateway")
        if gateway not in interface.network:
            raise invalid(f"{guest_field}.gateway", f"must lie in {interface.network}")
    elif gateway is None and interface.ip in net.subnet(version):
        gateway = net.gateway(version)
    if not await ipam.claim_address(net.customer_id, interface.ip, vm_id):
        raise _taken(f"{guest_field}.address", f"{interface.ip} is already in use")
    return FamilyPlan(str(interface), str(gateway) if gateway else "")


def _host_interface(nic: NetworkInterface, version: int, field: str) -> IPInterface | None:
    try:
        host = host_interface(nic, version)
    except ValueError as exc:
        raise invalid(field, str(exc)) from exc
    if host is not None and host.version != version:
        raise invalid(f"{field}.address", f"not an IPv{version} address")
    return host


def _guest_interface(
    ipam: Ipam, net: CustomerNetwork, guest: IpConfig, version: int, field: str, host: IPInterface | None
) -> IPInterface:
    address = _parse(guest.address, version, f"{field}.address")
    subnet, pool = net.subnet(version), ipam.pool(version)
    if address in pool and address not in subnet:
        raise invalid(
            f"{field}.address", f"inside metald's pool {pool} but outside the customer's subnet {subnet}"
        )
    if address in subnet and net.reserved(address):
        raise invalid(f"{field}.address", f"{address} is reserved (network, gateway or broadcast)")
    inside = subnet.prefixlen if address in subnet else 0
    prefix = guest.prefix_length or inside or (host.network.prefixlen if host else 0)
    if not prefix:
        raise invalid(f"{field}.prefix_length", "required for an address outside the customer's subnet")
    try:
        return ipaddress.ip_interface(f"{address}/{prefix}")
    except ValueError as exc:
        raise invalid(f"{field}.prefix_length", str(exc)) from exc


async def _claim_host_side(
    ipam: Ipam, net: CustomerNetwork, host: IPInterface | None, guest: IPInterface, field: str
) -> IPAddress | None:
    """Check and claim an explicit host-side address; returns it (the guest's gateway) or None."""
    if host is None:
        return None
    if host.ip == guest.ip or guest.ip not in host.network:
        raise invalid(field, f"must be another address of the guest's network {guest.network}")
    subnet, pool = net.subnet(host.version), ipam.pool(host.version)
    inside = _within(host.network, subnet)
    if not inside and host.network.overlaps(pool):
        raise invalid(field, f"{host.network} overlaps metald's pool {pool} outside {subnet}")
    if host.ip == net.gateway(host.version):
        return host.ip
    if not inside:
        other = await ipam.claim_host_network(net.customer_id, host.network)
        if other is not None:
            raise _taken(field, f"{host.network} overlaps {other}, used by another customer")
    if not await ipam.claim_host_address(net.customer_id, host.ip):
        raise _taken(f"{field}.address", f"{host.ip} is already in use")
    return host.ip


def _within(inner: IPNetwork, outer: IPNetwork) -> bool:
    return inner.network_address in outer and inner.broadcast_address in outer


def _configs(nic: NetworkInterface, version: int) -> tuple[IpConfig | None, IpConfig | None]:
    return (nic.host_ipv4, nic.guest_ipv4) if version == 4 else (nic.host_ipv6, nic.guest_ipv6)


def _parse(text: str, version: int, field: str) -> IPAddress:
    try:
        address = ipaddress.ip_address(text)
    except ValueError as exc:
        raise invalid(field, str(exc)) from exc
    if address.version != version:
        raise invalid(field, f"not an IPv{version} address")
    return address


def _taken(field: str, message: str) -> MetaldError:
    return conflict("NETWORK_ADDRESS_IN_USE", f"{field}: {message}", field=field)
