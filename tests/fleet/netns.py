"""The fleet's test network: a bridge in a namespace the test made, one namespace per host joined
to it by a veth pair, addresses only inside those namespaces (10.77.0.0/24), and a loopback
proxy so that clients in the root namespace can reach a gateway listening inside one."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import subprocess
import threading

SUBNET = "10.77.0"
CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class FleetNetwork:
    def __init__(self, prefix: str, hosts: int) -> None:
        self.bridge_ns = f"{prefix}br"
        self.host_ns = [f"{prefix}h{i}" for i in range(1, hosts + 1)]
        self.host_addresses = [f"{SUBNET}.{i}" for i in range(1, hosts + 1)]

    def create(self) -> FleetNetwork:
        _ip("netns", "add", self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "set", "lo", "up")
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "addr", "add", f"{SUBNET}.254/24", "dev", "br0")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, (ns, address) in enumerate(zip(self.host_ns, self.host_addresses, strict=True), start=1):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip(
                "-n",
                ns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                f"port{i}",
                "netns",
                self.bridge_ns,
            )
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", self.bridge_ns, "link", "set", f"port{i}", "master", "br0", "up")
        return self

    def destroy(self) -> None:
        for ns in [*self.host_ns, self.bridge_ns]:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into a named network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


class NetnsProxy:
    """127.0.0.1:<port> in the root namespace -> target inside a namespace: its thread enters the
    namespace, so the sockets it opens are there, while the listening socket (made here) is not."""

    def __init__(self, netns: str, target: tuple[str, int]) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._netns = netns
        self.target = target
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> None:
        """Once the namespace exists."""
        self._thread.start()

    def _serve(self) -> None:
        enter_netns(self._netns)
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(asyncio.start_server(self._relay, sock=self._listener))
        self._loop.run_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._listener.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError, RuntimeError):
        writer.close()
