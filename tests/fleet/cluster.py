"""A whole test fleet of real processes: one PostgreSQL, hosts each in its own network namespace,
gateways in the bridge namespace; every process reachable from the tests through a NetnsProxy."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import httpx

from metald.fleet.tokens import GatewayTokens
from tests.fleet.netns import FleetNetwork, NetnsProxy
from tests.fleet.postgres import Postgres
from tests.support.daemon import METALD, ServedProcess, kill_leftovers

HOST_PORT = 8080
HEARTBEAT_SECONDS = 1.0
LEASE_SECONDS = 4.0
# The gateways' HTTP server: METALD_TEST_GATEWAY_SERVER=pyvoy runs the fleet tests against pyvoy gateways.
GATEWAY_SERVER = os.environ.get("METALD_TEST_GATEWAY_SERVER", "hypercorn")


class FleetProcess(ServedProcess):
    """One metald process inside a namespace (`ip netns exec` execs it: its pid is metald's)."""

    def __init__(self, name: str, netns: str, argv: list[str], log_path: Path, proxy: NetnsProxy) -> None:
        self.name = name
        self.netns = netns
        self.argv = argv
        self.log_path = log_path
        self.proxy = proxy
        self.url = proxy.url  # from the root namespace, through the proxy
        self.inner_url = f"http://{proxy.target[0]}:{proxy.target[1]}"  # from inside the bridge namespace
        self.proc = None

    def start(self, timeout: float = 30) -> FleetProcess:
        self.spawn(["ip", "netns", "exec", self.netns, *METALD, *self.argv], self.name, timeout)
        return self


class Fleet:
    def __init__(
        self,
        root: Path,
        assets_dir: Path,
        *,
        hosts: int = 3,
        gateways: int = 2,
        gateway_servers: tuple[str, ...] = (),
    ) -> None:
        """`gateway_servers`: each gateway's HTTP server (default: GATEWAY_SERVER for all)."""
        self.root = root
        self.gateway_servers = gateway_servers or (GATEWAY_SERVER,) * gateways
        prefix = f"mdf{os.getpid() % 100000}"
        self.pg = Postgres()
        self.net = FleetNetwork(prefix, hosts)
        self.secret = secrets.token_hex(32).encode()
        self.secret_file = root / "fleet.secret"
        self.secret_file.write_bytes(self.secret)
        self.secret_file.chmod(0o600)
        self.tokens = GatewayTokens(self.secret)
        self.operator_token = secrets.token_hex(24)
        self.operator_token_file = root / "operator.token"
        self.operator_token_file.write_text(self.operator_token)
        self.operator_token_file.chmod(0o600)
        self.assets_dir = assets_dir
        self._proxies: list[NetnsProxy] = []
        self.hosts = [self._host(i) for i in range(hosts)]
        self.gateways = [self._gateway(i) for i in range(len(self.gateway_servers))]

    def _proxy(self, netns: str, target: tuple[str, int]) -> NetnsProxy:
        proxy = NetnsProxy(netns, target)
        self._proxies.append(proxy)
        return proxy

    def fleet_flags(self) -> list[str]:
        return [
            "--fleet-dsn",
            self.pg.dsn,
            "--fleet-secret-file",
            str(self.secret_file),
            "--log-format",
            "json",
        ]

    def _host(self, i: int) -> FleetProcess:
        name, ns, address = f"host{i + 1}", self.net.host_ns[i], self.net.host_addresses[i]
        data = self.root / name
        argv = [
            "serve",
            "--listen", f"{address}:{HOST_PORT}",
            "--data-dir", str(data),
            "--assets-dir", str(self.assets_dir),
            "--accel", "tcg",
            "--no-network-enabled",
            "--fleet-host-id", name,
            "--fleet-advertise-url", f"http://{address}:{HOST_PORT}",
            "--fleet-heartbeat-seconds", str(HEARTBEAT_SECONDS),
            "--fleet-lease-seconds", str(LEASE_SECONDS),
            *self.fleet_flags(),
        ]  # fmt: skip
        data.mkdir(parents=True, exist_ok=True)
        proxy = self._proxy(ns, (address, HOST_PORT))
        return FleetProcess(name, ns, argv, self.root / f"{name}.log", proxy)

    def _gateway(self, i: int) -> FleetProcess:
        name, port = f"gateway{i + 1}", 9100 + i
        argv = [
            "gateway", "--listen", f"127.0.0.1:{port}", "--server", self.gateway_servers[i],
            "--fleet-operator-token-file", str(self.operator_token_file), *self.fleet_flags(),
        ]  # fmt: skip
        proxy = self._proxy(self.net.bridge_ns, ("127.0.0.1", port))
        return FleetProcess(name, self.net.bridge_ns, argv, self.root / f"{name}.log", proxy)

    def start(self) -> Fleet:
        self.pg.start()
        self.net.create()
        for proxy in self._proxies:
            proxy.start()
        for process in [*self.hosts, *self.gateways]:
            process.start()
        return self

    def host_token(self, host: FleetProcess, customer: str) -> str:
        """What a gateway would send that host for the customer (to read a host's own truth)."""
        return self.tokens.mint(customer, host.name)

    def destroy(self) -> None:
        for process in [*self.gateways, *self.hosts]:
            process.stop()
        for host in self.hosts:
            kill_leftovers(self.root / host.name)
        for proxy in self._proxies:
            proxy.close()
        self.net.destroy()
        self.pg.destroy()


class FleetRpc:
    """Connect-JSON calls to a gateway as a customer, or to a host as the gateway would."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.http = httpx.Client(timeout=60)

    def call(self, url: str, method: str, body: dict[str, Any], token: str) -> httpx.Response:
        return self.http.post(
            f"{url}/vmprovisioner.v1.VmService/{method}",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        )

    def gw(self, i: int, method: str, body: dict[str, Any], customer: str) -> httpx.Response:
        return self.call(self.fleet.gateways[i].url, method, body, f"dev_customer_{customer}")

    def ok(self, i: int, method: str, body: dict[str, Any], customer: str) -> dict[str, Any]:
        response = self.gw(i, method, body, customer)
        assert response.status_code == 200, f"{method} -> {response.status_code} {response.text}"
        result: dict[str, Any] = response.json()
        return result

    def list_all(self, i: int, customer: str, page_size: int = 1000) -> list[str]:
        ids: list[str] = []
        token = ""
        while True:
            page = self.ok(i, "ListVms", {"page_size": page_size, "page_token": token}, customer)
            ids += [vm["vm_id"] for vm in page.get("vms", [])]
            token = page.get("next_page_token", "")
            if not token:
                return ids

    def on_host(self, host: FleetProcess, customer: str) -> list[str]:
        """The host's own truth: the customer's VMs in its SQLite, asked with a gateway token."""
        response = self.call(host.url, "ListVms", {"page_size": 1000}, self.fleet.host_token(host, customer))
        assert response.status_code == 200, response.text
        return [vm["vm_id"] for vm in response.json().get("vms", [])]

    def truth(self, customer: str) -> dict[str, list[str]]:
        """host name -> the customer's VM ids there (live hosts only)."""
        return {
            h.name: self.on_host(h, customer) for h in self.fleet.hosts if h.proc and h.proc.poll() is None
        }
