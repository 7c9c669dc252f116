"""What the fleet gateway costs and how it spreads: `python -m bench.fleet_gateway`.

A real fleet (tests/fleet/cluster.py: a throwaway PostgreSQL, 3 equal hosts each in its own
network namespace, 2 gateways) and three measurements, VMs created but never booted:
- latency: GetVmInfo and ListVms (the same 20 VMs, all on host1; with --running-vm, default, also
  GetVmInfo of one of them booted, whose every call reads its QEMU live, measured after the
  other rows since its TCG guest takes CPU) straight to the host and through
  a gateway, interleaved call by call in one run (the order alternates each round), binary Connect
  over one HTTP connection per side, from a client inside the bridge namespace (as a client next
  to a gateway: the gateway on loopback, hosts over their veths; no test proxy in the path);
  ratio = gateway p50 / direct p50 (target <= 1.5); with --pyvoy-side (default when pyvoy is
  installed) a third gateway served by pyvoy is a third side of the same rounds; and the floor of each server (a 404 from the
  same stack, no RPC), interleaved the same way;
- balance: 60 VMs created through both gateways: VMs per host, most/fewest (target <= 1.5);
- create rate: CreateVm calls per second through one gateway, then through two (the same total,
  the same client concurrency, split over both).
With --profile (default) the first gateway is sampled with py-spy while one client sends it
GetVmInfo calls back to back: where a forwarded call's CPU goes (inclusive and self shares).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

from connectrpc.codec import proto_binary_codec
from pyqwest import Client as HttpClient

from bench.api_load import PROFILE_RATE, py_spy, summarise_profile
from bench.common import machine_context, parser, percentile, print_table, workdir, write_results
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.gen.vmprovisioner.v1.vm_connect import VmServiceClient
from tests.fleet.cluster import Fleet, FleetRpc
from tests.fleet.netns import enter_netns

LIST_VMS = 20
Call = Callable[[], Awaitable[Any]]
T = TypeVar("T")


def in_bridge(fleet: Fleet, measure: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run an async measurement on a thread that entered the fleet's bridge namespace."""

    def run() -> T:
        enter_netns(fleet.net.bridge_ns)
        return asyncio.run(measure(*args))  # type: ignore[arg-type]

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


def _summary(samples_ms: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": statistics.median(samples_ms),
        "p99_ms": percentile(samples_ms, 99),
        "mean_ms": statistics.mean(samples_ms),
        "n": len(samples_ms),
    }


async def _interleaved(sides: dict[str, Call], rounds: int, warmup: int) -> dict[str, Any]:
    """Each side called once per round, the order rotating each round; ratios against "direct"."""
    calls = list(sides.items())
    for _ in range(warmup):
        for _, call in calls:
            await call()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(rounds):
        shift = i % len(calls)
        for name, call in calls[shift:] + calls[:shift]:
            started = time.perf_counter()
            await call()
            times[name].append((time.perf_counter() - started) * 1000)
    out: dict[str, Any] = {name: _summary(samples) for name, samples in times.items()}
    for name in sides:
        if name != "direct":
            suffix = name.removeprefix("gateway")  # "ratio_p50" for the gateway, "ratio_p50-pyvoy"…
            out[f"ratio_p50{suffix}"] = out[name]["p50_ms"] / out["direct"]["p50_ms"]
            out[f"ratio_p99{suffix}"] = out[name]["p99_ms"] / out["direct"]["p99_ms"]
    return out


async def latency(
    fleet: Fleet, customer: str, vm_id: str, rounds: int, warmup: int, *, info_only: bool = False
) -> dict[str, Any]:
    """Direct, through gateway1, and with --pyvoy-side through a pyvoy gateway too (the last one).
    `info_only`: the GetVmInfo row alone (of a booted VM, measured apart: its TCG guest takes CPU)."""
    host, gateway = fleet.hosts[0], fleet.gateways[0]
    pyvoy = fleet.gateways[-1] if fleet.gateway_servers[-1] == "pyvoy" else None
    gateway_headers = {"authorization": f"Bearer dev_customer_{customer}"}
    codec = proto_binary_codec()
    http = HttpClient()
    async with AsyncExitStack() as stack:
        direct = await stack.enter_async_context(VmServiceClient(host.inner_url, codec=codec))
        through = await stack.enter_async_context(VmServiceClient(gateway.inner_url, codec=codec))
        gateways = {"gateway": (gateway.inner_url, through)}
        if pyvoy is not None:
            client = await stack.enter_async_context(VmServiceClient(pyvoy.inner_url, codec=codec))
            gateways["gateway-pyvoy"] = (pyvoy.inner_url, client)

        def host_headers() -> dict[str, str]:  # what a gateway sends: a fresh gateway token
            return {"authorization": f"Bearer {fleet.host_token(host, customer)}"}

        info = pb.GetVmInfoRequest(vm_id=vm_id)
        listing = pb.ListVmsRequest(page_size=LIST_VMS)
        direct_list = await direct.list_vms(listing, headers=host_headers())
        for _, client in gateways.values():
            listed = await client.list_vms(listing, headers=gateway_headers)
            assert len(direct_list.vms) == len(listed.vms) == LIST_VMS, "every side lists the same VMs"

        def info_call(client: VmServiceClient) -> Call:
            return lambda: client.get_vm_info(info, headers=gateway_headers)

        def list_call(client: VmServiceClient) -> Call:
            return lambda: client.list_vms(listing, headers=gateway_headers)

        def empty_call(url: str) -> Call:
            return lambda: http.get(f"{url}/no-such-endpoint")

        info_row = await _interleaved(
            {
                "direct": lambda: direct.get_vm_info(info, headers=host_headers()),
                **{name: info_call(client) for name, (_, client) in gateways.items()},
            },
            rounds,
            warmup,
        )
        if info_only:
            return {"GetVmInfo": info_row}
        return {
            "GetVmInfo": info_row,
            "ListVms": await _interleaved(
                {
                    "direct": lambda: direct.list_vms(listing, headers=host_headers()),
                    **{name: list_call(client) for name, (_, client) in gateways.items()},
                },
                rounds,
                warmup,
            ),
            # The server floor on each side: a 404 from the same stack (the server, the edge layers,
            # the root app), no RPC. What a gateway adds to GetVmInfo compares with the gateway's.
            "empty request (404)": await _interleaved(
                {
                    "direct": empty_call(host.inner_url),
                    **{name: empty_call(url) for name, (url, _) in gateways.items()},
                },
                rounds,
                warmup,
            ),
        }


async def _create_many(
    urls: Sequence[str], customer: str, count: int, concurrency: int
) -> tuple[list[str], float]:
    """`count` CreateVm calls spread round-robin over `urls`, `concurrency` in flight; (ids, seconds)."""
    headers = {"authorization": f"Bearer dev_customer_{customer}"}
    codec = proto_binary_codec()
    clients = [VmServiceClient(url, codec=codec) for url in urls]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    created: list[str] = []

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            request = pb.CreateVmRequest(config=pb.VmConfig())
            created.append((await clients[i % len(clients)].create_vm(request, headers=headers)).vm_id)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return created, time.perf_counter() - started
    finally:
        for client in clients:
            await client.close()


async def _info_loop(url: str, customer: str, vm_id: str, seconds: float) -> int:
    """GetVmInfo calls back to back for `seconds`; how many."""
    headers = {"authorization": f"Bearer dev_customer_{customer}"}
    request, calls = pb.GetVmInfoRequest(vm_id=vm_id), 0
    async with VmServiceClient(url, codec=proto_binary_codec()) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await client.get_vm_info(request, headers=headers)
            calls += 1
    return calls


def profile_gateway(fleet: Fleet, customer: str, vm_id: str, seconds: float, raw: Path) -> dict[str, Any]:
    """py-spy on the first gateway for `seconds` under back-to-back GetVmInfo calls."""
    gateway = fleet.gateways[0]
    assert gateway.proc is not None
    with ThreadPoolExecutor(1) as pool:
        calls = pool.submit(in_bridge, fleet, _info_loop, gateway.inner_url, customer, vm_id, seconds + 2)
        time.sleep(1)
        subprocess.run(
            [py_spy(), "record", "--pid", str(gateway.proc.pid), "--duration", f"{seconds:g}",
             "--rate", str(PROFILE_RATE), "--format", "raw", "--nonblocking", "-o", str(raw)],
            capture_output=True, check=True, timeout=seconds + 60,
        )  # fmt: skip
        made = calls.result()
    return {"calls": made, **summarise_profile(raw.read_text(), seconds, PROFILE_RATE, 15)}


def _wait_listed(rpc: FleetRpc, customer: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(rpc.list_all(0, customer)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the fleet view never listed {count} VMs of {customer}")
        time.sleep(0.2)


def _delete_all(rpc: FleetRpc, customer: str) -> None:
    for vm_id in rpc.list_all(0, customer):
        rpc.ok(0, "DeleteVm", {"vm_id": vm_id, "force": True}, customer)


def main(argv: Sequence[str]) -> int:
    p = parser("fleet_gateway", __doc__ or "")
    p.add_argument("--rounds", type=int, default=400, help="interleaved calls per side and RPC")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--balance-vms", type=int, default=60)
    p.add_argument("--creates", type=int, default=60, help="CreateVm calls per create-rate run")
    p.add_argument("--concurrency", type=int, default=8, help="CreateVm calls in flight")
    p.add_argument(
        "--profile", action=argparse.BooleanOptionalAction, default=True, help="py-spy the gateway"
    )
    p.add_argument("--profile-seconds", type=float, default=5.0)
    p.add_argument(
        "--running-vm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also a GetVmInfo row for a booted VM (live reads of its VMM on each call), measured"
        " after the other rows",
    )
    p.add_argument(
        "--pyvoy-side",
        action=argparse.BooleanOptionalAction,
        default=importlib.util.find_spec("pyvoy") is not None,
        help="a third gateway served by pyvoy (`--server pyvoy`), a third interleaved latency side"
        " [default: on when pyvoy is installed]",
    )
    args = p.parse_args(argv)
    context = machine_context()
    with workdir(args.workdir) as root:
        (root / "fleet").mkdir(parents=True, exist_ok=True)
        servers = ("hypercorn", "hypercorn", *(("pyvoy",) if args.pyvoy_side else ()))
        fleet = Fleet(root / "fleet", args.assets_dir.resolve(), gateway_servers=servers)
        try:
            fleet.start()
            results = run(fleet, args, root)
        finally:
            fleet.destroy()
    write_results("fleet_gateway", argv, args, context, results)
    return 0


def run(fleet: Fleet, args: Any, root: Path) -> dict[str, Any]:
    rpc = FleetRpc(fleet)
    results: dict[str, Any] = {}

    # Balance first, on empty hosts.
    urls = [g.inner_url for g in fleet.gateways[:2]]  # the two hypercorn gateways
    ids, _ = in_bridge(fleet, _create_many, urls, "bench-balance", args.balance_vms, args.concurrency)
    per_host = Counter({name: len(vms) for name, vms in rpc.truth("bench-balance").items()})
    assert sum(per_host.values()) == len(ids) == args.balance_vms
    results["balance"] = {
        "vms": args.balance_vms,
        "per_host": dict(per_host),
        "most_over_fewest": max(per_host.values()) / max(1, min(per_host.values())),
    }
    print_table("balance", ["host", "VMs"], sorted(per_host.items()))
    _delete_all(rpc, "bench-balance")

    # Latency: the same 20 VMs on host1, made there directly; the fleet view learns them by heartbeat.
    host = fleet.hosts[0]
    made = [
        rpc.call(host.url, "CreateVm", {"config": {}}, fleet.host_token(host, "bench-latency")).json()[
            "vm_id"
        ]
        for _ in range(LIST_VMS)
    ]
    _wait_listed(rpc, "bench-latency", LIST_VMS)
    results["latency"] = in_bridge(
        fleet, lambda: latency(fleet, "bench-latency", made[0], args.rounds, args.warmup)
    )
    if args.profile:
        prof = profile_gateway(fleet, "bench-latency", made[0], args.profile_seconds, root / "gateway.txt")
        results["gateway_profile"] = prof
        print_table(
            f"py-spy: gateway GetVmInfo ({prof['calls']} calls)", ["frame", "% incl"], prof["inclusive_pct"]
        )
    if args.running_vm:  # a VM whose every GetVmInfo reads its QEMU live (booted after the rows above)
        token = fleet.host_token(host, "bench-latency")
        booted = rpc.call(host.url, "BootVm", {"vm_id": made[1], "wait_for_ready": True}, token)
        assert booted.status_code == 200, booted.text
        running = in_bridge(
            fleet,
            lambda: latency(fleet, "bench-latency", made[1], args.rounds, args.warmup, info_only=True),
        )
        results["latency"]["GetVmInfo, running VM"] = running["GetVmInfo"]
    rows = [
        (
            rpc_name,
            side,
            r[side]["p50_ms"],
            r[side]["p99_ms"],
            r.get(f"ratio_p50{side.removeprefix('gateway')}", ""),
        )
        for rpc_name, r in results["latency"].items()
        for side in ("direct", "gateway", "gateway-pyvoy")
        if side in r
    ]
    print_table("latency (ms)", ["rpc", "side", "p50", "p99", "ratio p50"], rows)
    _delete_all(rpc, "bench-latency")

    # Create rate through one gateway, then two.
    rates = {}
    for gateways in (1, 2):
        some = [g.inner_url for g in fleet.gateways[:gateways]]
        customer = f"bench-rate{gateways}"
        ids, seconds = in_bridge(fleet, _create_many, some, customer, args.creates, args.concurrency)
        rates[f"{gateways}_gateway{'s' if gateways > 1 else ''}"] = {
            "creates": len(ids),
            "seconds": seconds,
            "per_second": len(ids) / seconds,
        }
        _delete_all(rpc, f"bench-rate{gateways}")
    results["create_rate"] = rates
    print_table(
        "CreateVm rate", ["gateways", "creates", "s", "per s"], [(k, *v.values()) for k, v in rates.items()]
    )
    return results


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
