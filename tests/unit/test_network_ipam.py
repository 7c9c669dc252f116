"""IPAM and NIC planning on the real SqliteStore (a tmp file): uniqueness, persistence, refusals."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.model import IpConfig, NetworkInterface, Vm, VmConfig
from metald.domain.states import VmState
from metald.network.ipam import Ipam
from metald.network.plan import plan_vm
from metald.store.sqlite import SqliteStore

POOL4, POOL6 = "10.240.0.0/16", "fd6d:6574:616c::/48"


def make_vm(vm_id: str, customer: str, *nics: NetworkInterface) -> Vm:
    now = datetime.now(UTC)
    config = VmConfig(network=nics or (NetworkInterface("eth0", "TAP", "auto"),))
    return Vm(vm_id, customer, config, VmState.CREATED, now, now)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "metald.db")
    yield s
    await s.close()


@pytest.fixture
def ipam(store: SqliteStore) -> Ipam:
    return Ipam(store.addresses, POOL4, POOL6)


async def refusal(ipam: Ipam, vm: Vm) -> MetaldError:
    with pytest.raises(MetaldError) as info:
        await plan_vm(ipam, vm)
    return info.value


async def test_fifty_concurrent_plans_never_collide(ipam: Ipam) -> None:
    plans = await asyncio.gather(*(plan_vm(ipam, make_vm(f"vm_{n}", "acme")) for n in range(50)))
    nics = [p[0] for p in plans]
    net = await ipam.customer_network("acme")
    assert len({n.guest_ipv4 for n in nics}) == 50
    assert len({n.guest_ipv6 for n in nics}) == 50
    assert len({n.mac for n in nics}) == 50
    for nic in nics:
        assert ipaddress.ip_interface(nic.guest_ipv4).network == net.subnet4
        assert ipaddress.ip_interface(nic.guest_ipv6).network == net.subnet6
        assert (nic.gateway_ipv4, nic.gateway_ipv6) == (str(net.gateway(4)), str(net.gateway(6)))
    assert str(net.gateway(4)) == str(net.subnet4.network_address + 1)
    assert str(net.gateway(4)) + "/24" not in {n.guest_ipv4 for n in nics}


async def test_customers_get_distinct_networks_even_concurrently(ipam: Ipam) -> None:
    nets = await asyncio.gather(*(ipam.customer_network(f"cust{n}") for n in range(40)))
    assert len({n.index for n in nets}) == 40
    assert len({n.bridge for n in nets}) == 40
    assert all(n.subnet4.subnet_of(ipam.pool4) and n.subnet6.subnet_of(ipam.pool6) for n in nets)
    assert len({n.subnet4 for n in nets}) == len({n.subnet6 for n in nets}) == 40


async def test_restart_keeps_allocations(tmp_path: Path) -> None:
    path = tmp_path / "restart.db"
    first = await SqliteStore.open(path)
    before = [
        await plan_vm(Ipam(first.addresses, POOL4, POOL6), make_vm(f"vm_{n}", "acme")) for n in range(5)
    ]
    index = (await Ipam(first.addresses, POOL4, POOL6).customer_network("acme")).index
    await first.close()

    second = await SqliteStore.open(path)  # "daemon restart": new store, new Ipam, same file
    ipam = Ipam(second.addresses, POOL4, POOL6)
    after = await asyncio.gather(*(plan_vm(ipam, make_vm(f"vm_new{n}", "acme")) for n in range(20)))
    assert (await ipam.customer_network("acme")).index == index
    old = {p[0].guest_ipv4 for p in before} | {p[0].guest_ipv6 for p in before}
    new = {p[0].guest_ipv4 for p in after} | {p[0].guest_ipv6 for p in after}
    assert not old & new and len(new) == 40
    await second.close()


async def test_release_frees_addresses_and_macs(ipam: Ipam) -> None:
    first = (await plan_vm(ipam, make_vm("vm_a", "acme")))[0]
    second = (await plan_vm(ipam, make_vm("vm_b", "acme")))[0]
    await ipam.release("vm_a", "acme")
    await ipam.release("vm_a", "acme")  # idempotent
    again = (await plan_vm(ipam, make_vm("vm_a", "acme")))[0]
    assert again == first  # lowest free address again, same derived MAC
    assert second.guest_ipv4 != first.guest_ipv4


async def test_replanning_a_vm_that_holds_resources_is_refused_and_keeps_them(ipam: Ipam) -> None:
    first = (await plan_vm(ipam, make_vm("vm_a", "acme")))[0]
    err = await refusal(ipam, make_vm("vm_a", "acme"))
    assert err.code is ErrorCode.ALREADY_EXISTS and err.reason == "NETWORK_NAME_COLLISION"
    other = (await plan_vm(ipam, make_vm("vm_b", "acme")))[0]
    assert other.guest_ipv4 != first.guest_ipv4  # vm_a's claims survived the refusal


async def test_only_tap_is_offered(ipam: Ipam) -> None:
    vm = make_vm("vm_a", "acme", NetworkInterface("eth0", "TAP"), NetworkInterface("eth1", "VHOST_USER"))
    err = await refusal(ipam, vm)
    assert err.code is ErrorCode.INVALID_ARGUMENT
    assert err.metadata["field"] == "config.network[1].type"
    assert (await plan_vm(ipam, make_vm("vm_b", "acme", NetworkInterface("eth0", "")))) != ()


async def test_explicit_mac_is_validated_and_unique_per_customer(ipam: Ipam) -> None:
    nic = NetworkInterface("eth0", "TAP", "02:AA:00:00:00:01")
    assert (await plan_vm(ipam, make_vm("vm_a", "acme", nic)))[0].mac == "02:aa:00:00:00:01"
    err = await refusal(ipam, make_vm("vm_b", "acme", nic))
    assert (err.code, err.metadata["field"]) == (ErrorCode.ALREADY_EXISTS, "config.network[0].guest_mac")
    await plan_vm(ipam, make_vm("vm_c", "other", nic))  # another customer's bridge: fine
    bad = await refusal(ipam, make_vm("vm_d", "acme", NetworkInterface("eth0", "TAP", "03:00:00:00:00:01")))
    assert (bad.code, bad.metadata["field"]) == (ErrorCode.INVALID_ARGUMENT, "config.network[0].guest_mac")


async def test_refusal_gives_back_what_the_vm_had_claimed(ipam: Ipam) -> None:
    taken = NetworkInterface("eth0", "TAP", guest_ipv4=IpConfig("192.168.7.10", 24))
    await plan_vm(ipam, make_vm("vm_a", "acme", taken))
    clash = NetworkInterface("eth1", "TAP", guest_ipv4=IpConfig("192.168.7.10", 24))
    err = await refusal(ipam, make_vm("vm_b", "acme", NetworkInterface("eth0", "TAP"), clash))
    assert (err.code, err.metadata["field"]) == (
        ErrorCode.ALREADY_EXISTS,
        "config.network[1].guest_ipv4.address",
    )
    # vm_b's first interface had been given an address and a MAC: both are free again
    retry = (await plan_vm(ipam, make_vm("vm_b", "acme")))[0]
    assert retry.guest_ipv4.endswith(".2/24") and retry.mac


async def test_explicit_addresses_with_host_side_gateway(ipam: Ipam) -> None:
    nic = NetworkInterface(
        "eth0",
        "TAP",
        host_ipv4=IpConfig("192.168.1.1", 24, "192.168.1.254"),
        guest_ipv4=IpConfig("192.168.1.100", 24),
    )
    planned = (await plan_vm(ipam, make_vm("vm_a", "acme", nic)))[0]
    assert (planned.guest_ipv4, planned.gateway_ipv4) == ("192.168.1.100/24", "192.168.1.1")
    assert (planned.guest_ipv6, planned.gateway_ipv6) == ("", "")  # only the given family
    # a second VM of the same customer may share the gateway, not the guest address
    nic2 = NetworkInterface(
        "eth0", "TAP", host_ipv4=IpConfig("192.168.1.1", 24), guest_ipv4=IpConfig("192.168.1.101", 24)
    )
    assert (await plan_vm(ipam, make_vm("vm_b", "acme", nic2)))[0].gateway_ipv4 == "192.168.1.1"
    err = await refusal(ipam, make_vm("vm_c", "acme", nic))
    assert err.metadata["field"] == "config.network[0].guest_ipv4.address"
    # another customer may not put an overlapping network on its bridge (one routing table)
    nic3 = NetworkInterface(
        "eth0", "TAP", host_ipv4=IpConfig("192.168.1.2", 25), guest_ipv4=IpConfig("192.168.1.3", 25)
    )
    err = await refusal(ipam, make_vm("vm_d", "other", nic3))
    assert (err.code, err.metadata["field"]) == (ErrorCode.ALREADY_EXISTS, "config.network[0].host_ipv4")
    # ...but may use the same guest address without a host side (it never meets the other bridge)
    alone = NetworkInterface("eth0", "TAP", guest_ipv4=IpConfig("192.168.1.100", 24))
    assert (await plan_vm(ipam, make_vm("vm_e", "other", alone)))[0].gateway_ipv4 == ""


async def test_explicit_v6_only_and_guest_gateway(ipam: Ipam) -> None:
    nic = NetworkInterface(
        "eth0",
        "TAP",
        host_ipv6=IpConfig("2001:db8:1::1", 64),
        guest_ipv6=IpConfig("2001:db8:1::100", 64, "2001:db8:1::fe"),
    )
    planned = (await plan_vm(ipam, make_vm("vm_a", "acme", nic)))[0]
    assert (planned.guest_ipv4, planned.guest_ipv6, planned.gateway_ipv6) == (
        "",
        "2001:db8:1::100/64",
        "2001:db8:1::fe",
    )


async def test_explicit_address_inside_own_subnet(ipam: Ipam) -> None:
    net = await ipam.customer_network("acme")
    wanted = net.subnet4.network_address + 77
    nic = NetworkInterface("eth0", "TAP", guest_ipv4=IpConfig(str(wanted)))
    planned = (await plan_vm(ipam, make_vm("vm_a", "acme", nic)))[0]
    assert (planned.guest_ipv4, planned.gateway_ipv4) == (f"{wanted}/24", str(net.gateway(4)))
    autos = await asyncio.gather(*(plan_vm(ipam, make_vm(f"vm_{n}", "acme")) for n in range(80)))
    assert f"{wanted}/24" not in {p[0].guest_ipv4 for p in autos}


@pytest.mark.parametrize(
    ("nic", "field"),
    [
        (
            NetworkInterface("eth0", guest_ipv4=IpConfig("10.240.0.9", 24)),
            "config.network[0].guest_ipv4.address",
        ),
        (NetworkInterface("eth0", guest_ipv4=IpConfig("not-an-ip")), "config.network[0].guest_ipv4.address"),
        (
            NetworkInterface("eth0", guest_ipv4=IpConfig("fd00::1", 64)),
            "config.network[0].guest_ipv4.address",
        ),
        (
            NetworkInterface("eth0", guest_ipv4=IpConfig("192.168.5.5")),
            "config.network[0].guest_ipv4.prefix_length",
        ),
        (
            NetworkInterface("eth0", guest_ipv4=IpConfig("192.168.5.5", 33)),
            "config.network[0].guest_ipv4.prefix_length",
        ),
        (NetworkInterface("eth0", host_ipv4=IpConfig("192.168.5.1", 24)), "config.network[0].host_ipv4"),
        (
            NetworkInterface(
                "eth0", host_ipv4=IpConfig("192.168.6.1", 24), guest_ipv4=IpConfig("192.168.5.5", 24)
            ),
            "config.network[0].host_ipv4",
        ),
        (
            NetworkInterface("eth0", host_ipv4=IpConfig("10.240.0.0", 8), guest_ipv4=IpConfig("10.1.0.5", 8)),
            "config.network[0].host_ipv4",
        ),
        (
            NetworkInterface("eth0", guest_ipv4=IpConfig("192.168.5.5", 24, "192.168.6.1")),
            "config.network[0].guest_ipv4.gateway",
        ),
    ],
)
async def test_bad_explicit_addresses_name_the_field(ipam: Ipam, nic: NetworkInterface, field: str) -> None:
    err = await refusal(ipam, make_vm("vm_a", "acme", nic))
    assert (err.code, err.metadata["field"]) == (ErrorCode.INVALID_ARGUMENT, field)


async def test_reserved_and_foreign_subnet_addresses_are_refused(ipam: Ipam) -> None:
    mine = await ipam.customer_network("acme")
    theirs = await ipam.customer_network("other")
    for address, problem in ((mine.gateway(4), "reserved"), (theirs.subnet4.network_address + 5, "outside")):
        err = await refusal(
            ipam, make_vm("vm_a", "acme", NetworkInterface("eth0", guest_ipv4=IpConfig(str(address))))
        )
        assert err.code is ErrorCode.INVALID_ARGUMENT and problem in err.message
    # the customer's own gateway, but with a prefix reaching into other customers' subnets
    wide = NetworkInterface(
        "eth0",
        host_ipv4=IpConfig(str(mine.gateway(4)), 16),
        guest_ipv4=IpConfig(str(mine.subnet4.network_address + 9), 16),
    )
    err = await refusal(ipam, make_vm("vm_b", "acme", wide))
    assert (err.code, err.metadata["field"]) == (ErrorCode.INVALID_ARGUMENT, "config.network[0].host_ipv4")


async def test_pool_exhaustion_is_resource_exhausted(store: SqliteStore) -> None:
    ipam = Ipam(store.addresses, "10.9.0.0/24", "fd00:9::/64")  # room for exactly one customer
    await ipam.customer_network("first")
    with pytest.raises(MetaldError) as info:
        await ipam.customer_network("second")
    assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED


def test_bad_pools_are_a_configuration_error(store: SqliteStore) -> None:
    for v4, v6 in (("10.0.0.0/25", POOL6), (POOL4, "fd00::/65"), ("nonsense", POOL6)):
        with pytest.raises(MetaldError) as info:
            Ipam(store.addresses, v4, v6)
        assert info.value.code is ErrorCode.FAILED_PRECONDITION
