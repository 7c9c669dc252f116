"""Guest networking through the API, with real guests (QEMU microvm, TCG) and their guest agent.

A daemon of this module's own (its own host namespace) so that it can be restarted. At most three
guests run at once: the machine has two cores. Traffic goes only between the guests and the
daemon's host namespace, which this test's daemon created.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from metald.backends.qemu.agent import GuestAgent
from metald.network import names
from tests.conftest import serving
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed"),
]

LIMIT = 1_000_000  # bytes/s
TRANSFER = 3_000_000
WEB_PORT = 8000  # busybox httpd inside guests
HOST_PORT = 18081  # the test's HTTP server on the gateway address, in the host namespace

# Run in the daemon's host namespace: GET /N sends N bytes, POST swallows the body.
HTTP_SERVER = r"""
import http.server, socket, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        n = int(self.path.strip("/") or 0)
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        chunk = b"x" * 65536
        while n > 0:
            self.wfile.write(chunk[: min(n, len(chunk))])
            n -= min(n, len(chunk))
    def do_POST(self):
        n = int(self.headers["Content-Length"])
        while n > 0:
            got = self.rfile.read(min(n, 65536))
            if not got:
                break
            n -= len(got)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
srv = Server(("::", int(sys.argv[1])), H)
print("ready", flush=True)
srv.serve_forever()
"""


class Guest:
    """One booted VM: its API view and a shell through the guest agent."""

    def __init__(self, daemon: Daemon, rpc: Rpc, vm_id: str) -> None:
        self.daemon, self.rpc, self.vm_id = daemon, rpc, vm_id
        self.agent: GuestAgent | None = None

    async def info(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.rpc.info, self.vm_id)

    async def nic(self) -> dict[str, Any]:
        interfaces: list[dict[str, Any]] = (await self.info())["network_info"]["interfaces"]
        return interfaces[0]

    async def sh(self, command: str, timeout: float = 60) -> tuple[int, str]:
        if self.agent is None:
            self.agent = await GuestAgent.connect(self.daemon.data_dir / "vms" / self.vm_id)
            assert await self.agent.ping(20), f"{self.vm_id}: guest agent does not answer"
        return await self.agent.exec(command, timeout=timeout)

    async def forget_agent(self) -> None:
        """After a reboot or a daemon restart: connect afresh next time."""
        if self.agent is not None:
            await self.agent.close()
            self.agent = None

    async def pings(self, address: str) -> bool:
        rc, _ = await self.sh(f"ping -c 1 -W 2 {address}")
        return rc == 0

    async def fetches(self, url: str) -> bool:
        rc, _ = await self.sh(f"timeout 4 wget -q -O /dev/null {url}")
        return rc == 0

    async def rate(self, url: str, *, upload: bool) -> float:
        """Bytes/s of a TRANSFER-byte HTTP GET (guest RX) or POST (guest TX), timed on the host: the
        guest's own clock runs on jiffies under TCG and drifts when the host is loaded."""
        if upload:  # busybox wget posts the file as a C string: no NUL bytes in it
            rc, out = await self.sh(f"head -c {TRANSFER} /dev/zero | tr '\\0' x > /tmp/blob")
            assert rc == 0, out
            cmd = f"wget -q -O /dev/null --post-file /tmp/blob {url}"
        else:
            cmd = f"wget -q -O /dev/null {url}{TRANSFER}"
        started = time.monotonic()
        rc, out = await self.sh(cmd)
        elapsed = time.monotonic() - started
        assert rc == 0, out
        return TRANSFER / elapsed


def url(address: str, port: int, path: str = "/") -> str:
    host = address.split("/")[0]
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


def gateways(nic: dict[str, Any]) -> tuple[str, str]:
    """The customer's default gateways (.1 and ::1 of the guest's subnets)."""
    v4 = nic["guest_ipv4"].split("/")[0].rsplit(".", 1)[0] + ".1"
    v6 = nic["guest_ipv6"].split("/")[0].rsplit(":", 1)[0] + ":1"
    return v4, v6


def ip_json(netns: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-n", netns, "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


async def host_fetches(daemon: Daemon, target: str) -> bool:
    """Whether the daemon's host namespace reaches target (a positive control for the walls)."""
    fetch = f"import urllib.request; urllib.request.urlopen({target!r}, timeout=4)"
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", daemon.host_netns, sys.executable, "-c", fetch
    )
    return await proc.wait() == 0


def netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines()}


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Iterator[Daemon]:
    with serving(
        Daemon(tmp_path_factory.mktemp("metald-net"), assets_dir, name="net")
    ) as daemon:  # stops it, kills its VMMs, removes its namespaces
        yield daemon


@pytest.fixture
def rpcs(netd: Daemon, customer: str) -> Iterator[tuple[Rpc, Rpc]]:
    """Two customers of the network daemon; their VMs are deleted afterwards."""
    clients = (Rpc(netd.url, customer + "a"), Rpc(netd.url, customer + "b"))
    try:
        yield clients
    finally:
        for client in clients:
            client.delete_all()


@contextlib.asynccontextmanager
async def host_server(netd: Daemon) -> AsyncIterator[None]:
    """The test's HTTP server in the host namespace (made by the first boot with a NIC)."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", netd.host_netns, sys.executable, "-c", HTTP_SERVER, str(HOST_PORT),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() == b"ready"
    try:
        yield
    finally:
        proc.kill()
        await proc.wait()


async def boot(daemon: Daemon, rpc: Rpc, nic: dict[str, Any] | None = None) -> Guest:
    config = {"network": [{"interface_id": "eth0", **(nic or {})}]}
    vm_id = await asyncio.to_thread(rpc.create, config)
    await asyncio.to_thread(rpc.ok, "BootVm", {"vm_id": vm_id, "wait_for_ready": True})
    return Guest(daemon, rpc, vm_id)


async def test_reachability_walls_and_rate_limits(netd: Daemon, rpcs: tuple[Rpc, Rpc]) -> None:
    a_rpc, b_rpc = rpcs
    limited = {"rate_limit": {"bandwidth_bytes_per_second": LIMIT, "refill_time_millis": 100}}
    a1 = await boot(netd, a_rpc, limited)
    a2 = await boot(netd, a_rpc)
    b1 = await boot(netd, b_rpc)
    async with host_server(netd):
        await check_reachability_walls_and_rate_limits(netd, a1, a2, b1)
    for guest in (a1, a2, b1):
        await guest.forget_agent()


async def check_reachability_walls_and_rate_limits(netd: Daemon, a1: Guest, a2: Guest, b1: Guest) -> None:
    nic = {g.vm_id: await g.nic() for g in (a1, a2, b1)}
    v4 = {vm: n["guest_ipv4"].split("/")[0] for vm, n in nic.items()}
    v6 = {vm: n["guest_ipv6"].split("/")[0] for vm, n in nic.items()}
    gw = {vm: gateways(n) for vm, n in nic.items()}

    # network_info describes what exists.
    for guest in (a1, a2, b1):
        info = (await guest.info())["network_info"]
        links = {link["ifname"] for link in ip_json(info["namespace"], "link", "show")}
        assert info["interfaces"][0]["tap_device"] in links
        host = {link["ifname"] for link in ip_json(netd.host_netns, "link", "show")}
        assert info["interfaces"][0]["host_device_name"] in host
        _, mac = await guest.sh("cat /sys/class/net/eth0/address")
        assert mac.strip() == info["interfaces"][0]["guest_mac"]

    # Gateways over v4 and v6; VMs of one customer reach each other.
    for guest in (a1, a2, b1):
        assert await guest.pings(gw[guest.vm_id][0]) and await guest.pings(gw[guest.vm_id][1])
    assert await a1.pings(v4[a2.vm_id]) and await a1.pings(v6[a2.vm_id])
    for guest in (a2, b1):
        assert (
            await guest.sh(
                f"mkdir -p /tmp/www && echo hi > /tmp/www/index.html && httpd -p {WEB_PORT} -h /tmp/www"
            )
        )[0] == 0
    assert await a1.fetches(url(v4[a2.vm_id], WEB_PORT)) and await a1.fetches(url(v6[a2.vm_id], WEB_PORT))

    # Another customer's VM: neither ping nor TCP, though its web server is up (the host reaches it).
    for address in (v4[b1.vm_id], v6[b1.vm_id]):
        assert not await a1.pings(address)
        assert not await a1.fetches(url(address, WEB_PORT))
        assert await host_fetches(netd, url(address, WEB_PORT))
    assert not await b1.pings(v4[a1.vm_id])
    assert not await b1.pings(gw[a1.vm_id][0]) and not await b1.pings(gw[a1.vm_id][1])

    # The gateway answers the test's server; the API port is closed to guests everywhere.
    assert await b1.fetches(url(gw[b1.vm_id][0], HOST_PORT, "/10"))
    assert await b1.fetches(url(gw[b1.vm_id][1], HOST_PORT, "/10"))
    for address in (*gw[b1.vm_id], "127.0.0.1"):
        assert not await b1.fetches(url(address, netd.port, "/health"))
    assert not await b1.fetches(url(gw[a1.vm_id][0], HOST_PORT, "/10"))  # not another gateway

    # rate_limit 1 MB/s in each direction; without it, clearly faster.
    base = url(gw[a1.vm_id][0], HOST_PORT)
    rx, tx = await a1.rate(base, upload=False), await a1.rate(base, upload=True)
    free_base = url(gw[a2.vm_id][0], HOST_PORT)
    free_rx, free_tx = await a2.rate(free_base, upload=False), await a2.rate(free_base, upload=True)
    print(f"limited rx {rx:.0f} tx {tx:.0f} B/s; unlimited rx {free_rx:.0f} tx {free_tx:.0f} B/s")
    assert 0.8 * LIMIT <= rx <= 1.2 * LIMIT and 0.8 * LIMIT <= tx <= 1.2 * LIMIT
    assert free_rx > 2 * LIMIT and free_tx > 2 * LIMIT
    metrics = (await a1.info())["metrics"]
    assert int(metrics["network_rx_bytes"]) >= TRANSFER and int(metrics["network_tx_bytes"]) >= TRANSFER


async def test_explicit_addresses_v4_only_and_v6_only(netd: Daemon, rpcs: tuple[Rpc, Rpc]) -> None:
    rpc = rpcs[0]
    v4 = await boot(
        netd,
        rpc,
        {
            "host_ipv4": {"address": "192.168.77.1", "prefix_length": 24},
            "guest_ipv4": {"address": "192.168.77.10", "prefix_length": 24},
        },
    )
    v6 = await boot(
        netd,
        rpc,
        {
            "host_ipv6": {"address": "fd00:77::1", "prefix_length": 64},
            "guest_ipv6": {"address": "fd00:77::10", "prefix_length": 64},
        },
    )
    assert (await v4.nic())["guest_ipv4"] == "192.168.77.10/24" and not (await v4.nic()).get("guest_ipv6")
    assert (await v6.nic())["guest_ipv6"] == "fd00:77::10/64" and not (await v6.nic()).get("guest_ipv4")
    assert await v4.pings("192.168.77.1")
    assert await v6.pings("fd00:77::1")
    _, addresses = await v4.sh("ip -6 addr show dev eth0 scope global")
    assert "inet6" not in addresses
    # another customer cannot take the address, nor put the same network on its bridge
    status, body = await asyncio.to_thread(
        rpcs[1].error,
        "CreateVm",
        {"config": {"network": [{"interface_id": "eth0", "host_ipv4": {"address": "192.168.77.2", "prefix_length": 24}, "guest_ipv4": {"address": "192.168.77.11", "prefix_length": 24}}]}},
    )  # fmt: skip
    assert status == 409 and body["code"] == "already_exists", body
    for guest in (v4, v6):
        await guest.forget_agent()


async def test_auto_mac_stable_across_reboot_and_restart(netd: Daemon, rpcs: tuple[Rpc, Rpc]) -> None:
    rpc = rpcs[0]
    guest = await boot(netd, rpc)
    nic = await guest.nic()
    gw4 = gateways(nic)[0]

    async def mac_in_guest() -> str:
        _, out = await guest.sh("cat /sys/class/net/eth0/address")
        return out.strip()

    assert await mac_in_guest() == nic["guest_mac"]
    await guest.forget_agent()
    await asyncio.to_thread(rpc.ok, "RebootVm", {"vm_id": guest.vm_id})
    await asyncio.to_thread(rpc.ok, "ShutdownVm", {"vm_id": guest.vm_id, "force": True})
    await asyncio.to_thread(rpc.ok, "BootVm", {"vm_id": guest.vm_id, "wait_for_ready": True})
    assert await mac_in_guest() == nic["guest_mac"] and await guest.pings(gw4)
    await guest.forget_agent()
    await asyncio.to_thread(netd.restart)  # hard kill; the VM keeps running and is adopted
    assert await guest.nic() == nic
    assert await mac_in_guest() == nic["guest_mac"] and await guest.pings(gw4)
    await guest.forget_agent()


def test_ipam_unique_across_concurrent_creates_and_a_restart(netd: Daemon, rpcs: tuple[Rpc, Rpc]) -> None:
    rpc = rpcs[0]
    config = {"network": [{"interface_id": "eth0"}, {"interface_id": "eth1"}]}
    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(lambda _: rpc.create(config), range(25)))
        netd.restart()
        second = list(pool.map(lambda _: rpc.create(config), range(25)))
    with sqlite3.connect(f"file:{netd.data_dir / 'metald.db'}?mode=ro", uri=True) as db:
        rows = db.execute(
            f"SELECT nics FROM vms WHERE vm_id IN ({','.join('?' * 50)})", [*first, *second]
        ).fetchall()
    nics = [n for (text,) in rows for n in json.loads(text)]
    assert len(rows) == 50 and len(nics) == 100
    for key in ("guest_ipv4", "guest_ipv6", "mac"):
        assert len({n[key] for n in nics}) == 100, key


def test_twenty_cycles_leave_nothing_behind(netd: Daemon, rpcs: tuple[Rpc, Rpc]) -> None:
    rpc = rpcs[0]
    limited = {"bandwidth_bytes_per_second": LIMIT, "refill_time_millis": 100}
    config = {"network": [{"interface_id": "eth0", "rate_limit": limited}]}
    vm_ids = []
    for n in range(20):
        vm_id = rpc.create(config)
        rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": n % 5 == 0})
        info = rpc.info(vm_id)["network_info"]
        assert info["namespace"] in netns_list()
        rpc.ok("DeleteVm", {"vm_id": vm_id, "force": True})
        vm_ids.append(vm_id)
    assert not {names.vm_netns(v) for v in vm_ids} & netns_list()
    links = ip_json(netd.host_netns, "link", "show")
    leftovers = [
        link["ifname"]
        for link in links
        if names.host_veth_id8(link["ifname"]) in {names.id8(v) for v in vm_ids}
    ]
    assert leftovers == []
    assert ip_json(netd.host_netns, "link", "show", "type", "veth") == []
    ports = json.loads(subprocess.run(["bridge", "-n", netd.host_netns, "-j", "link", "show"], capture_output=True, text=True, check=True).stdout or "[]")  # fmt: skip
    assert ports == []
    qdiscs = subprocess.run(
        ["tc", "-n", netd.host_netns, "qdisc", "show"], capture_output=True, text=True, check=True
    )
    assert "tbf" not in qdiscs.stdout
