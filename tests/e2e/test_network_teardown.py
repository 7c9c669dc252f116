"""Teardown of what is already gone, reads of vanishing namespaces, walls removed while VMs run.

Uses the stand-in lab of test_network_plumbing (namespaces of the test's own only).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from metald.network import LinuxNetwork, names, walls
from metald.store.sqlite import SqliteStore
from tests.e2e import test_network_plumbing as stand_ins
from tests.e2e.test_network_plumbing import HOST, PREFIX, Lab, ash, bare, host_links, netns_list, pings

pytestmark = pytest.mark.e2e
lab = stand_ins.lab  # the fixture


async def test_detach_after_a_host_reboot_is_success(lab: Lab) -> None:
    vm = await lab.add_vm("r1", "acme")
    await lab.attach("r1")
    # A host reboot: every namespace (the VM's and metald's host namespace) and device is gone.
    await ash("ip", "netns", "del", names.vm_netns(vm.vm_id))
    await ash("ip", "netns", "del", HOST)
    assert await lab.network.describe(vm) is None
    await lab.network.detach(vm)
    await lab.network.detach(vm)
    # ...and the next attach rebuilds the host namespace, the bridge, the walls and the VM's devices.
    again = await lab.network.attach(vm)
    assert again == lab.attachments["r1"] and await lab.network.describe(vm) == again
    assert await walls.installed_rules(HOST)
    await ash("ip", "-n", names.vm_netns(vm.vm_id), "link", "del", again.nics[0].tap_device)  # TAP gone
    await ash("ip", "-n", HOST, "link", "del", again.interfaces[0].host_device_name)  # veth gone
    await lab.network.detach(vm)
    assert names.vm_netns(vm.vm_id) not in await netns_list()


async def test_delete_of_a_never_booted_vm_before_the_host_namespace_exists(lab: Lab, tmp_path: Path) -> None:
    vm = await lab.add_vm("n1", "acme")
    store = await SqliteStore.open(tmp_path / "fresh.db")
    fresh = LinuxNetwork(
        store.addresses,
        host_netns=PREFIX + "never-made",
        ipv4_pool="10.240.0.0/16",
        ipv6_pool="fd6d:6574:616c::/48",
        allow_egress=False,
    )
    try:
        await fresh.detach(vm)  # what DeleteVm does for a never-booted VM
        assert await fresh.describe(vm) is None
        assert await fresh.remove_orphans(set()) == []
        assert PREFIX + "never-made" not in await netns_list()
    finally:
        await store.close()


async def test_describe_never_fails_while_the_namespace_vanishes(lab: Lab) -> None:
    for n in range(6):
        vm = await lab.add_vm(f"v{n}", "acme")
        attachment = await lab.attach(f"v{n}")
        reads = [asyncio.ensure_future(lab.network.describe(vm)) for _ in range(20)]
        await asyncio.sleep(0.001 * n)
        await lab.detach(f"v{n}")
        for seen in await asyncio.gather(*reads):  # never an error: the whole attachment, or None
            assert seen is None or seen == attachment
        assert await lab.network.describe(vm) is None


async def test_walls_removed_while_vms_run_are_reported_and_restored(lab: Lab) -> None:
    a1, b1 = await lab.add_vm("w1", "acme"), await lab.add_vm("w2", "bolt")
    for name in ("w1", "w2"):
        await lab.attach(name)
    ga, gb = await lab.stand_in("w1"), await lab.stand_in("w2")
    b_address = bare(b1.nics[0].guest_ipv4)
    assert await pings(ga, a1.nics[0].gateway_ipv4) and not await pings(ga, b_address)
    expected = await walls.installed_rules(HOST)

    await ash("ip", "netns", "exec", HOST, "nft", "delete", "table", "inet", walls.TABLE)
    health = await lab.network.ping()  # sees the hole, reports it, and starts restoring
    assert health.status == "degraded" and "missing" in health.detail, health
    for _ in range(50):
        if await walls.installed_rules(HOST) == expected:
            break
        await asyncio.sleep(0.1)
    assert await walls.installed_rules(HOST) == expected
    assert (await lab.network.ping()).status == "healthy"
    assert not await pings(ga, b_address) and not await pings(gb, bare(a1.nics[0].guest_ipv4))
    assert not await pings(ga, b1.nics[0].gateway_ipv4)  # another customer's gateway: walled again

    # A table emptied by hand (rules flushed, table kept) is as bad as a missing one.
    await ash("ip", "netns", "exec", HOST, "nft", "flush", "table", "inet", walls.TABLE)
    assert (await lab.network.ping()).status == "degraded"
    for _ in range(50):
        if await walls.installed_rules(HOST) == expected:
            break
        await asyncio.sleep(0.1)
    assert (await lab.network.ping()).status == "healthy"
    assert names.CUSTOMER_BRIDGE_PREFIX in "".join(await host_links())
