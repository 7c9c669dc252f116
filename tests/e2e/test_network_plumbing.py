"""LinuxNetwork on real namespaces, without guests: a stand-in plays each guest.

Each stand-in is a namespace of the test's own holding the guest address on a veth whose peer
sits in the VM's namespace, with a small relay (like QEMU) copying frames between that peer and
the VM's TAP, so traffic takes the TAP and both token buckets exactly as a guest's would.
All traffic stays inside namespaces this test creates; the host namespace is test-only.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from metald.domain.errors import MetaldError
from metald.domain.events import VmEvent, VmEventType
from metald.domain.model import NetworkInterface, RateLimit, Vm, VmConfig
from metald.domain.states import VmState
from metald.network import LinuxNetwork, names
from metald.network.plumbing import marker
from metald.ports import NetworkAttachment
from metald.store.sqlite import SqliteStore

pytestmark = pytest.mark.e2e

PREFIX = f"mdt-{os.getpid()}-"
HOST = PREFIX + "host"
API_PORT = 18080  # stands for the metald API port: blocked to guests even on their gateway
OPEN_PORT = 18081
LIMIT = 1_000_000  # bytes/s
TRANSFER = 3_000_000  # bytes per measured direction
IFNAME = "g0"  # the stand-in's "eth0"
PEER = "gp0"  # its peer in the VM namespace, relayed to the TAP

# Stand-in tools, run with `ip netns exec NS python -c TOOL MODE ...` (stdlib only).
TOOL = r"""
import fcntl, os, select, socket, struct, sys, time

def relay(tap, peer):
    # Like QEMU with vnet_hdr: frames keep their offload header between TAP and packet socket.
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", tap.encode(), 0x0002 | 0x1000 | 0x4000))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sock.setsockopt(263, 15, 1)  # PACKET_VNET_HDR
    sock.setsockopt(263, 23, 1)  # PACKET_IGNORE_OUTGOING
    sock.bind((peer, 0))
    print("ready", flush=True)
    while True:
        for ready in select.select([fd, sock], [], [])[0]:
            if ready is sock:
                os.write(fd, sock.recv(70000))
            else:
                sock.send(os.read(fd, 70000))

def serve(addr, port):
    srv = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, int(port)))
    srv.listen(8)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        f = conn.makefile("rb")
        mode, n = f.readline().split()
        n = int(n)
        if mode == b"send":
            chunk = b"x" * 65536
            while n > 0:
                n -= conn.send(chunk[: min(n, len(chunk))])
        else:
            while n > 0:
                got = f.read1(min(n, 65536))
                if not got:
                    break
                n -= len(got)
            conn.sendall(b"k")
        f.close()
        conn.close()

def client(mode, addr, port, n):
    n = int(n)
    conn = socket.create_connection((addr, int(port)), timeout=3)
    conn.settimeout(30)
    conn.sendall(f"{mode} {n}\n".encode())
    started = time.monotonic()
    if mode == "send":  # the server sends: we receive
        left = n
        while left > 0:
            got = conn.recv(65536)
            assert got, "connection closed early"
            left -= len(got)
    else:
        chunk = b"y" * 65536
        left = n
        while left > 0:
            left -= conn.send(chunk[: min(left, len(chunk))])
        assert conn.recv(1) == b"k"
    print(n / (time.monotonic() - started))

globals()[sys.argv[1]](*sys.argv[2:])
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, capture_output=True, check=False)


async def ash(*argv: str, stdin: str = "", check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate(stdin.encode())
    assert proc.returncode == 0 or not check, f"{argv}: {err.decode()}"
    return out.decode()


async def netns_list() -> set[str]:
    return {line.split()[0] for line in (await ash("ip", "netns", "list")).splitlines()}


async def host_links() -> set[str]:
    return {link["ifname"] for link in json.loads(await ash("ip", "-n", HOST, "-j", "link", "show"))}


async def in_ns(ns: str, *argv: str, timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, *argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode()


async def pings(ns: str, address: str) -> bool:
    rc, _ = await in_ns(ns, "ping", "-c", "1", "-W", "1", address)
    return rc == 0


async def rate(ns: str, mode: str, address: str, port: int, n: int) -> float | None:
    """Bytes/s of a bounded TCP transfer from the stand-in (None if it cannot connect)."""
    rc, out = await in_ns(ns, sys.executable, "-c", TOOL, "client", mode, address, str(port), str(n))
    return float(out.split()[-1]) if rc == 0 else None


def bare(address: str) -> str:
    return address.split("/")[0]


@dataclass
class Lab:
    store: SqliteStore
    network: LinuxNetwork
    vms: dict[str, Vm] = field(default_factory=dict)
    attachments: dict[str, NetworkAttachment] = field(default_factory=dict)
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    timings: dict[str, list[float]] = field(default_factory=lambda: {"attach": [], "detach": []})

    async def spawn(self, ns: str, *args: str) -> None:
        """A long-running tool in ns; returns once it says "ready"."""
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, sys.executable, "-c", TOOL, *args, stdout=subprocess.PIPE
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() == b"ready"

    async def add_vm(self, name: str, customer: str, limit: RateLimit | None = None) -> Vm:
        now = datetime.now(UTC)
        nic = NetworkInterface("eth0", "TAP", "auto", rate_limit=limit)
        vm = Vm(PREFIX + name, customer, VmConfig(network=(nic,)), VmState.CREATED, now, now)
        vm.nics = await self.network.plan(vm)
        await self.store.vms.insert(
            vm, VmEvent(vm.vm_id, customer, VmEventType.CREATED, vm.state, vm.state, "", now)
        )
        self.vms[name] = vm
        return vm

    async def attach(self, name: str) -> NetworkAttachment:
        started = time.monotonic()
        self.attachments[name] = await self.network.attach(self.vms[name])
        self.timings["attach"].append(time.monotonic() - started)
        return self.attachments[name]

    async def detach(self, name: str) -> None:
        started = time.monotonic()
        await self.network.detach(self.vms[name])
        self.timings["detach"].append(time.monotonic() - started)

    async def stand_in(self, name: str) -> str:
        """The guest's stand-in namespace, configured as the guest would configure itself."""
        vm, nic = self.vms[name], self.vms[name].nics[0]
        ns, vm_ns = PREFIX + name, names.vm_netns(vm.vm_id)
        await ash("ip", "netns", "add", ns)
        await ash("ip", "-n", ns, "link", "add", IFNAME, "type", "veth", "peer", "name", PEER, "netns", vm_ns)
        lines = [
            f"link set {IFNAME} address {nic.mac}",
            "link set lo up",
            f"link set {IFNAME} up",
            f"addr add {nic.guest_ipv4} dev {IFNAME}",
            f"addr add {nic.guest_ipv6} dev {IFNAME} nodad",
            f"route add default via {nic.gateway_ipv4}",
            f"route add default via {nic.gateway_ipv6}",
        ]
        await ash("ip", "-n", ns, "-batch", "-", stdin="\n".join(lines))
        await ash("ip", "-n", vm_ns, "link", "set", PEER, "up")
        await self.spawn(vm_ns, "relay", self.attachments[name].nics[0].tap_device, PEER)
        return ns


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    store = await SqliteStore.open(tmp_path / "metald.db")
    network = LinuxNetwork(
        store.addresses,
        host_netns=HOST,
        ipv4_pool="10.240.0.0/16",
        ipv6_pool="fd6d:6574:616c::/48",
        allow_egress=False,
        blocked_ports=(API_PORT,),
    )
    lab = Lab(store, network)
    try:
        yield lab
    finally:
        for proc in lab.procs:
            proc.kill()
            await proc.wait()
        await network.remove_orphans(set())
        for ns in await netns_list():
            if ns.startswith(PREFIX):
                await ash("ip", "netns", "del", ns, check=False)
        await store.close()
    assert not {ns for ns in await netns_list() if ns.startswith(PREFIX)}
    assert not {names.vm_netns(vm.vm_id) for vm in lab.vms.values()} & await netns_list()


@pytest.fixture
def foreign_vm_netns() -> Iterator[str]:
    """A VM namespace made by "another metald" (another host namespace): orphan sweeps skip it."""
    ns = names.vm_netns(PREFIX + "foreign")
    sh("ip", "netns", "add", ns)
    sh("ip", "-n", ns, "link", "set", "lo", "alias", marker(PREFIX + "elsewhere"))
    try:
        yield ns
    finally:
        sh("ip", "netns", "del", ns)


async def test_walls_rate_limits_and_cleanup(lab: Lab, foreign_vm_netns: str) -> None:
    a1 = await lab.add_vm("a1", "acme", RateLimit(LIMIT, 0, 100))
    a2 = await lab.add_vm("a2", "acme")
    b1 = await lab.add_vm("b1", "bolt")
    for name in ("a1", "a2", "b1"):
        await lab.attach(name)

    # What was created is what describe() finds, and re-attaching changes nothing.
    for name, vm in lab.vms.items():
        attachment = lab.attachments[name]
        assert attachment.namespace == names.vm_netns(vm.vm_id) in await netns_list()
        assert attachment.nics[0].tap_device == names.tap_device(vm.vm_id, 0)
        assert attachment.interfaces[0].host_device_name in await host_links()
        assert await lab.network.describe(vm) == attachment
    before = await host_links()
    assert await lab.network.attach(a1) == lab.attachments["a1"]
    assert await host_links() == before
    qdiscs = json.loads(await ash("tc", "-n", names.vm_netns(a1.vm_id), "-j", "qdisc", "show"))
    tbf = [(q["dev"], q["options"]["rate"]) for q in qdiscs if q["kind"] == "tbf"]
    assert sorted(tbf) == [(lab.attachments["a1"].nics[0].tap_device, LIMIT), ("up0", LIMIT)]
    ruleset = await ash("ip", "netns", "exec", HOST, "nft", "list", "ruleset")
    assert ruleset.count("table inet metald") == 1 and ruleset.count("jump from_guests") == 1

    g = {name: await lab.stand_in(name) for name in ("a1", "a2", "b1")}
    gw4 = {name: vm.nics[0].gateway_ipv4 for name, vm in lab.vms.items()}
    gw6 = {name: vm.nics[0].gateway_ipv6 for name, vm in lab.vms.items()}
    v4 = {name: bare(vm.nics[0].guest_ipv4) for name, vm in lab.vms.items()}
    v6 = {name: bare(vm.nics[0].guest_ipv6) for name, vm in lab.vms.items()}

    # Gateways, and VMs of one customer, are reachable over v4 and v6.
    for name in ("a1", "a2", "b1"):
        assert await pings(g[name], gw4[name]) and await pings(g[name], gw6[name]), name
    assert await pings(g["a1"], v4["a2"]) and await pings(g["a1"], v6["a2"])
    assert await pings(g["a2"], v4["a1"])

    # Another customer's VM and gateway are not.
    for target in (v4["b1"], v6["b1"], gw4["b1"], gw6["b1"]):
        assert not await pings(g["a1"], target), target
    assert not await pings(g["b1"], v4["a2"])
    await lab.spawn(g["b1"], "serve", "::", str(OPEN_PORT))
    await lab.spawn(g["a2"], "serve", "::", str(OPEN_PORT))
    for target in (v4["b1"], v6["b1"]):  # TCP too, while the host side does reach b1's server
        assert await rate(g["a1"], "recv", target, OPEN_PORT, 1000) is None
        assert await rate(HOST, "recv", target, OPEN_PORT, 1000) is not None
    assert await rate(g["a1"], "recv", v4["a2"], OPEN_PORT, 1000) is not None

    # The gateway answers on an ordinary port, never on the API port.
    await lab.spawn(HOST, "serve", "::", str(OPEN_PORT))
    await lab.spawn(HOST, "serve", "::", str(API_PORT))
    assert await rate(g["b1"], "recv", gw4["b1"], OPEN_PORT, 1000) is not None
    assert await rate(g["b1"], "recv", gw4["b1"], API_PORT, 1000) is None
    assert await rate(g["b1"], "recv", gw6["b1"], API_PORT, 1000) is None
    assert await rate(g["b1"], "recv", gw4["a1"], OPEN_PORT, 1000) is None  # not another gateway

    # Token bucket: 1 MB/s each way through a1's TAP; a2 has no limit.
    rx = await rate(g["a1"], "send", gw4["a1"], OPEN_PORT, TRANSFER)
    tx = await rate(g["a1"], "recv", gw4["a1"], OPEN_PORT, TRANSFER)
    free = await rate(g["a2"], "recv", gw4["a2"], OPEN_PORT, TRANSFER)
    print(f"a1 guest rx {rx:.0f} B/s, guest tx {tx:.0f} B/s; a2 unlimited tx {free:.0f} B/s")
    assert rx is not None and 0.8 * LIMIT <= rx <= 1.2 * LIMIT
    assert tx is not None and 0.8 * LIMIT <= tx <= 1.2 * LIMIT
    assert free is not None and free > 3 * LIMIT
    described = await lab.network.describe(a1)  # one netlink read: the links and their counters
    assert described is not None and described == lab.attachments["a1"]
    assert described.counters.guest_rx_bytes >= TRANSFER and described.counters.guest_tx_bytes >= TRANSFER

    # Detach removes the VM's namespace and host veth; the orphan sweep takes what a crash left.
    await lab.detach("a2")
    assert names.vm_netns(a2.vm_id) not in await netns_list()
    assert names.host_veth(a2.vm_id, 0) not in await host_links()
    assert await lab.network.describe(a2) is None
    await lab.detach("a2")  # idempotent
    removed = await lab.network.remove_orphans({a1.vm_id})
    assert sorted(removed) == sorted([names.vm_netns(b1.vm_id), names.host_veth(b1.vm_id, 0)])
    assert foreign_vm_netns in await netns_list()  # another host namespace's VM: untouched
    await lab.detach("a1")
    assert {link for link in await host_links() if not link.startswith(names.CUSTOMER_BRIDGE_PREFIX)} == {
        "lo"
    }
    assert not {names.vm_netns(vm.vm_id) for vm in lab.vms.values()} & await netns_list()
    print(
        "attach ms: "
        + ", ".join(f"{t * 1000:.0f}" for t in lab.timings["attach"])
        + "; detach ms: "
        + ", ".join(f"{t * 1000:.0f}" for t in lab.timings["detach"])
    )


async def test_attach_converges_after_a_crash_halfway(lab: Lab) -> None:
    vm = await lab.add_vm("c1", "acme", RateLimit(LIMIT, 0, 100))
    vm_ns = names.vm_netns(vm.vm_id)
    await ash("ip", "netns", "add", vm_ns)  # crashed right after creating the namespace
    first = await lab.attach("c1")
    await ash("ip", "-n", vm_ns, "link", "del", "br0")  # ...or after losing part of the devices
    await ash("ip", "-n", vm_ns, "link", "del", first.nics[0].tap_device)
    assert await lab.attach("c1") == first
    links = {link["ifname"]: link for link in json.loads(await ash("ip", "-n", vm_ns, "-j", "link", "show"))}
    assert set(links) == {"lo", "br0", "up0", first.nics[0].tap_device}
    assert links[first.nics[0].tap_device]["master"] == links["up0"]["master"] == "br0"
    ports = json.loads(await ash("bridge", "-n", HOST, "-j", "link", "show"))
    assert [p["ifname"] for p in ports] == [names.host_veth(vm.vm_id, 0)]
    health = await lab.network.ping()
    assert health.status == "healthy" and "1 customer bridge" in health.detail
    await lab.detach("c1")
    assert vm_ns not in await netns_list()


async def test_failed_attach_leaves_nothing(lab: Lab) -> None:
    vm = await lab.add_vm("f1", "acme")
    vm_ns = names.vm_netns(vm.vm_id)
    await ash("ip", "netns", "add", vm_ns)  # a corrupt leftover: "up0" is no veth, so enslaving vh_ fails
    await ash("ip", "-n", vm_ns, "link", "add", "up0", "type", "bridge")
    with pytest.raises(MetaldError) as info:
        await lab.network.attach(vm)
    assert names.host_veth(vm.vm_id, 0) in info.value.message
    assert vm_ns not in await netns_list()
    assert names.host_veth(vm.vm_id, 0) not in await host_links()


async def test_concurrent_attach_and_timing(lab: Lab) -> None:
    customers = [f"cust{n}" for n in range(4)]
    for n in range(12):
        await lab.add_vm(f"m{n}", customers[n % 4])
    await asyncio.gather(*(lab.attach(name) for name in list(lab.vms)))
    for name, vm in lab.vms.items():
        assert await lab.network.describe(vm) == lab.attachments[name]
    ports = json.loads(await ash("bridge", "-n", HOST, "-j", "link", "show"))
    assert sorted(p["ifname"] for p in ports) == sorted(names.host_veth(v.vm_id, 0) for v in lab.vms.values())
    assert len({p["master"] for p in ports}) == 4
    ruleset = await ash("ip", "netns", "exec", HOST, "nft", "list", "table", "inet", "metald")
    for bridge in {p["master"] for p in ports}:  # every bridge made it into the walls, despite the race
        assert f'"{bridge}" . "{bridge}"' in ruleset
    await asyncio.gather(*(lab.detach(name) for name in list(lab.vms)))
    assert json.loads(await ash("bridge", "-n", HOST, "-j", "link", "show")) == []

    lab.timings = {"attach": [], "detach": []}
    for name in list(lab.vms)[:10]:  # one at a time, bridge and walls already in place
        await lab.attach(name)
        await lab.detach(name)
    attach, detach = sorted(lab.timings["attach"]), sorted(lab.timings["detach"])
    print(f"attach median {attach[5] * 1000:.0f} ms (max {attach[-1] * 1000:.0f}); "
          f"detach median {detach[5] * 1000:.0f} ms (max {detach[-1] * 1000:.0f})")  # fmt: skip
    assert attach[5] < 0.5 and detach[5] < 0.5
