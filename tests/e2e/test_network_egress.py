"""Egress under a policy, with real guests, against an "outside" that this test builds.

    guest -> mb_<n> (daemon's host namespace) -> egr0 =veth= out0 (the test's "outside" namespace)

The outside namespace holds the far end of the uplink (198.18.0.1/24, standing for the host's own
side of the way out) and two "internet" addresses on its loopback, 203.0.113.10 and .20, with HTTP
servers on a few ports. The daemon's host namespace is made by the test (so that the uplink is in it
before the daemon starts) and routes by default to the outside namespace; nothing leaves the
namespaces this test creates.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import stop_and_sweep
from tests.e2e.test_network_api import HTTP_SERVER, WEB_PORT, Guest, boot, url
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

pytestmark = [pytest.mark.e2e]

UPLINK, FAR_END = "egr0", "out0"
TRANSFER_NET = ("198.18.0.2/24", "198.18.0.1/24")  # (the host namespace's end, the outside's end)
ALLOWED, OTHER = "203.0.113.10", "203.0.113.20"
TRANSFER_NET6 = ("fd00:198::2/64", "fd00:198::1/64")
ALLOWED6 = "2001:db8:10::10"
PORT, OTHER_PORT = 8080, 8081


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def outside_of(daemon: Daemon) -> str:
    return daemon.host_netns + "-out"  # swept with the daemon's namespaces (same prefix)


@pytest.fixture(scope="module")
def egd(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Iterator[Daemon]:
    daemon = Daemon(
        tmp_path_factory.mktemp("metald-egress"),
        assets_dir,
        "--network-allow-egress",
        "--network-egress-uplink",
        UPLINK,
        "--network-walls-check-seconds",
        "2",
        name="egr",
    )
    host, outside = daemon.host_netns, outside_of(daemon)
    try:
        sh("ip", "netns", "add", host)
        sh("ip", "netns", "add", outside)
        sh("ip", "-n", host, "link", "add", UPLINK, "type", "veth", "peer", "name", FAR_END, "netns", outside)
        sh("ip", "-n", host, "addr", "add", TRANSFER_NET[0], "dev", UPLINK)
        sh("ip", "-n", host, "link", "set", UPLINK, "up")
        sh("ip", "-n", host, "route", "add", "default", "via", TRANSFER_NET[1].split("/")[0])
        sh("ip", "-n", host, "addr", "add", TRANSFER_NET6[0], "dev", UPLINK, "nodad")
        sh("ip", "-n", host, "-6", "route", "add", "default", "via", TRANSFER_NET6[1].split("/")[0])
        sh("ip", "-n", outside, "addr", "add", TRANSFER_NET6[1], "dev", FAR_END, "nodad")
        sh("ip", "-n", outside, "addr", "add", f"{ALLOWED6}/128", "dev", "lo")
        sh("ip", "-n", outside, "addr", "add", TRANSFER_NET[1], "dev", FAR_END)
        for address in (ALLOWED, OTHER):
            sh("ip", "-n", outside, "addr", "add", f"{address}/32", "dev", "lo")
        sh("ip", "-n", outside, "link", "set", "lo", "up")
        sh("ip", "-n", outside, "link", "set", FAR_END, "up")
        daemon.start()
        yield daemon
    finally:
        stop_and_sweep(daemon)


@contextlib.asynccontextmanager
async def outside_servers(daemon: Daemon, ports: list[int]) -> AsyncIterator[None]:
    procs = []
    try:
        for port in ports:
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", outside_of(daemon), sys.executable, "-c", HTTP_SERVER, str(port),
                stdout=subprocess.PIPE,
            )  # fmt: skip
            procs.append(proc)
            assert proc.stdout is not None
            assert (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() == b"ready"
        yield
    finally:
        for proc in procs:
            proc.kill()
            await proc.wait()


@pytest.fixture
def rpcs(egd: Daemon, customer: str) -> Iterator[tuple[Rpc, Rpc]]:
    clients = (Rpc(egd.url, customer + "a"), Rpc(egd.url, customer + "b"))
    try:
        yield clients
    finally:
        for client in clients:
            client.delete_all()


def policy(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"egress": {"allow": list(rules)}}


def health(daemon: Daemon) -> tuple[str, str]:
    body = httpx.get(f"{daemon.url}/health", timeout=10).json()
    return body["status"], body["checks"]["network"]["detail"]


async def test_policy_validation_names_the_field(egd: Daemon, rpcs: tuple[Rpc, Rpc]) -> None:
    rpc = rpcs[0]
    cases = [
        ({"cidr": "203.0.113.0/33"}, "config.network[0].egress.allow[0].cidr"),
        ({"cidr": "203.0.113.0/24", "ports": [70000]}, "config.network[0].egress.allow[0].ports"),
        ({"cidr": "203.0.113.0/24", "protocol": "gre"}, "config.network[0].egress.allow[0].protocol"),
    ]
    for rule, field in cases:
        config = {"network": [{"interface_id": "eth0", **policy({"cidr": "198.51.100.0/24"}, rule)}]}
        config["network"][0]["egress"]["allow"].reverse()  # the bad rule first: allow[0]
        status, body = await asyncio.to_thread(rpc.error, "CreateVm", {"config": config})
        assert status == 400 and body["code"] == "invalid_argument", body
        assert field in body["message"], body
    page = await asyncio.to_thread(rpc.ok, "ListVms", {})
    assert not page.get("vms")  # nothing was created


async def test_egress_allowed_exactly_and_never_to_other_customers(
    egd: Daemon, rpcs: tuple[Rpc, Rpc]
) -> None:
    a_rpc, b_rpc = rpcs
    a1_policy = policy(
        {"cidr": f"{ALLOWED}/32", "ports": [PORT], "protocol": "tcp"},
        {"cidr": f"{ALLOWED}/32", "ports": [egd.port]},  # the API port: never, whatever the policy
        {"cidr": "198.18.0.0/24"},  # the uplink's own network (the host side): never
        {"cidr": "10.0.0.0/8"},  # other customers' subnets (metald's pool): never
        {"cidr": "2001:db8:10::/64", "ports": [PORT], "protocol": "tcp"},
        {"cidr": "fd00::/8"},  # metald's IPv6 pool and the uplink's own network: never
    )
    a1 = await boot(egd, a_rpc, a1_policy)
    b1 = await boot(egd, b_rpc)
    async with outside_servers(egd, [PORT, OTHER_PORT, egd.port]):
        assert await a1.fetches(url(ALLOWED, PORT))  # through the bridge, NAT and the uplink
        assert not await a1.fetches(url(ALLOWED, OTHER_PORT))  # another port
        assert not await a1.fetches(url(OTHER, PORT))  # another destination
        assert not await a1.fetches(url(ALLOWED, egd.port))
        assert not await a1.fetches(url(TRANSFER_NET[1].split("/")[0], PORT))
        assert await a1.fetches(url(ALLOWED6, PORT))  # IPv6 too, masqueraded behind fd00:198::2
        assert not await a1.fetches(url(ALLOWED6, OTHER_PORT))
        assert not await a1.fetches(url(TRANSFER_NET6[1].split("/")[0], PORT))
        assert not await b1.fetches(url(ALLOWED6, PORT))
        assert not await b1.fetches(url(ALLOWED, PORT))  # no policy: default deny
        await check_other_customer_unreachable(a1, b1)

        # A new VM config with another policy applies at its boot; a1 keeps its own.
        a2 = await boot(egd, a_rpc, policy({"cidr": "203.0.113.0/28", "ports": [OTHER_PORT], "protocol": ""}))
        assert await a2.fetches(url(ALLOWED, OTHER_PORT)) and not await a2.fetches(url(ALLOWED, PORT))
        assert await a1.fetches(url(ALLOWED, PORT)) and not await a1.fetches(url(ALLOWED, OTHER_PORT))
        # a2 posing as a1 (its MAC and address) gets nothing of a1's policy: the source guard drops it.
        await pose_as(a2, await a1.nic())
        assert not await a2.fetches(url(ALLOWED, PORT))
        await a2.forget_agent()
        await asyncio.to_thread(a_rpc.ok, "DeleteVm", {"vm_id": a2.vm_id, "force": True})

        # The policy is re-applied from the stored config at every boot, and kept across a restart.
        await a1.forget_agent()
        await asyncio.to_thread(a_rpc.ok, "ShutdownVm", {"vm_id": a1.vm_id, "force": True})
        assert not await host_allows(egd)  # a1's rule went with its network
        await asyncio.to_thread(a_rpc.ok, "BootVm", {"vm_id": a1.vm_id, "wait_for_ready": True})
        assert await a1.fetches(url(ALLOWED, PORT))
        await a1.forget_agent()
        await b1.forget_agent()
        await asyncio.to_thread(egd.restart)
        assert await a1.fetches(url(ALLOWED, PORT)) and not await a1.fetches(url(OTHER, PORT))

        # Walls deleted while VMs run: /health says degraded, then they are back and still hold.
        sh("ip", "netns", "exec", egd.host_netns, "nft", "delete", "table", "inet", "metald")
        status, detail = await asyncio.to_thread(health, egd)
        assert status == "degraded" and "missing" in detail, detail
        assert await asyncio.to_thread(wait_healthy, egd, 15)
        await check_other_customer_unreachable(a1, b1)
        assert await a1.fetches(url(ALLOWED, PORT)) and not await a1.fetches(url(OTHER, PORT))
    for guest in (a1, b1):
        await guest.forget_agent()


async def pose_as(guest: Guest, nic: dict[str, Any]) -> None:
    address = nic["guest_ipv4"]
    gateway = address.split("/")[0].rsplit(".", 1)[0] + ".1"
    steps = [
        "ip link set eth0 down",
        f"ip link set eth0 address {nic['guest_mac']}",
        "ip link set eth0 up",
        "ip addr flush dev eth0",
        f"ip addr add {address} dev eth0",
        f"ip route add default via {gateway}",
    ]
    rc, out = await guest.sh(" && ".join(steps))
    assert rc == 0, out


def wait_healthy(daemon: Daemon, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while health(daemon)[0] != "healthy":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


async def check_other_customer_unreachable(a1: Guest, b1: Guest) -> None:
    b_address = (await b1.nic())["guest_ipv4"].split("/")[0]
    rc, out = await b1.sh(
        f"mkdir -p /tmp/www && echo hi > /tmp/www/index.html && (pidof httpd || httpd -p {WEB_PORT} -h /tmp/www)"
    )
    assert rc == 0, out
    assert not await a1.pings(b_address) and not await a1.fetches(url(b_address, WEB_PORT))
    assert not await b1.pings((await a1.nic())["guest_ipv4"].split("/")[0])


async def host_allows(daemon: Daemon) -> bool:
    """Whether the host namespace's egress chain opens anything for a guest now."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", daemon.host_netns, "nft", "list", "chain", "inet", "metald", "egress",
        stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return "accept" in out.decode()
