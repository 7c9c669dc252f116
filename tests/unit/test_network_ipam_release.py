"""Address claims end with the customer's last VM: subnets go back to the pool and are reused,
and a customer's host-side networks stop blocking others once its VMs are gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.model import IpConfig, NetworkInterface, Vm, VmConfig
from metald.domain.states import VmState
from metald.network.ipam import Ipam
from metald.network.plan import plan_vm
from metald.ports import Store
from metald.store.memory import MemoryStore
from metald.store.sqlite import SqliteStore

POOL4, POOL6 = "10.240.0.0/16", "fd6d:6574:616c::/48"  # the defaults: 256 customer networks


def make_vm(vm_id: str, customer: str, *nics: NetworkInterface) -> Vm:
    now = datetime.now(UTC)
    config = VmConfig(network=nics or (NetworkInterface("eth0", "TAP", "auto"),))
    return Vm(vm_id, customer, config, VmState.CREATED, now, now)


def explicit(host: str, guest: str, prefix: int) -> NetworkInterface:
    return NetworkInterface(
        "eth0", "TAP", "auto", host_ipv4=IpConfig(host, prefix), guest_ipv4=IpConfig(guest, prefix)
    )


@pytest.fixture(params=["sqlite", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = await SqliteStore.open(tmp_path / "metald.db") if request.param == "sqlite" else MemoryStore()
    yield s
    await s.close()


async def test_subnets_are_reused_past_256_customers_over_time(store: Store) -> None:
    ipam = Ipam(store.addresses, POOL4, POOL6)
    seen: set[int] = set()
    for n in range(300):
        vm = make_vm(f"vm_{n}", f"customer-{n}")
        await plan_vm(ipam, vm)
        seen.add((await ipam.customer_network(vm.customer_id)).index)
        await ipam.release(vm.vm_id, vm.customer_id)
    assert len(seen) <= 256
    assert await store.addresses.used_addresses("netindex") == set()


async def test_a_full_pool_refuses_until_a_customer_leaves_then_reuses_its_subnet(store: Store) -> None:
    ipam = Ipam(store.addresses, "10.9.0.0/23", "fd00:9::/63")  # two customer networks
    await plan_vm(ipam, make_vm("vm_a", "a"))
    await plan_vm(ipam, make_vm("vm_b", "b"))
    with pytest.raises(MetaldError) as info:
        await plan_vm(ipam, make_vm("vm_c", "c"))
    assert info.value.reason == "NETWORK_POOL_EXHAUSTED"
    freed = (await ipam.customer_network("a")).index
    await ipam.release("vm_a", "a")
    (nic,) = await plan_vm(ipam, make_vm("vm_c", "c"))
    assert (await ipam.customer_network("c")).index == freed
    assert nic.guest_ipv4 == f"10.9.{freed}.2/24"


async def test_the_network_stays_while_another_vm_of_the_customer_uses_it(store: Store) -> None:
    ipam = Ipam(store.addresses, POOL4, POOL6)
    first = (await plan_vm(ipam, make_vm("vm_a", "acme")))[0]
    second = (await plan_vm(ipam, make_vm("vm_b", "acme")))[0]
    index = (await ipam.customer_network("acme")).index
    await ipam.release("vm_a", "acme")
    assert (await ipam.customer_network("acme")).index == index
    assert await store.addresses.used_addresses("ipv4@acme") == {second.guest_ipv4.split("/")[0]}
    third = (await plan_vm(ipam, make_vm("vm_c", "acme")))[0]
    assert third.guest_ipv4 == first.guest_ipv4  # the freed address, same subnet


async def test_a_squatters_host_network_is_free_once_its_vms_are_deleted(store: Store) -> None:
    ipam = Ipam(store.addresses, POOL4, POOL6)
    await plan_vm(ipam, make_vm("vm_s1", "squatter", explicit("192.168.0.1", "192.168.0.2", 16)))
    await plan_vm(ipam, make_vm("vm_s2", "squatter", explicit("192.168.0.1", "192.168.0.3", 16)))
    ordinary = explicit("192.168.5.1", "192.168.5.2", 24)
    with pytest.raises(MetaldError) as info:
        await plan_vm(ipam, make_vm("vm_o", "other", ordinary))
    assert info.value.code is ErrorCode.ALREADY_EXISTS and "another customer" in info.value.message
    await ipam.release("vm_s1", "squatter")
    with pytest.raises(MetaldError):  # still one VM of the squatter on that network
        await plan_vm(ipam, make_vm("vm_o", "other", ordinary))
    await ipam.release("vm_s2", "squatter")
    (nic,) = await plan_vm(ipam, make_vm("vm_o", "other", ordinary))
    assert nic.guest_ipv4 == "192.168.5.2/24" and nic.gateway_ipv4 == "192.168.5.1"
    assert await store.addresses.used_addresses("hostnet") == {"192.168.5.0/24"}


async def test_plans_racing_the_last_release_never_share_a_subnet(store: Store) -> None:
    ipam = Ipam(store.addresses, "10.9.0.0/23", "fd00:9::/63")
    for round_ in range(20):
        await plan_vm(ipam, make_vm(f"vm_a{round_}", "a"))
        release = ipam.release(f"vm_a{round_}", "a")
        plans = [plan_vm(ipam, make_vm(f"vm_b{round_}_{n}", "b")) for n in range(3)]
        again = plan_vm(ipam, make_vm(f"vm_a{round_}x", "a"))
        await asyncio.gather(release, *plans, again)
        a, b = await ipam.customer_network("a"), await ipam.customer_network("b")
        assert a.index != b.index
        await ipam.release(f"vm_a{round_}x", "a")
        for n in range(3):
            await ipam.release(f"vm_b{round_}_{n}", "b")
    assert await store.addresses.used_addresses("netindex") == set()
