"""Load: many concurrent clients mixing reads and lifecycle calls for a bounded time.

CLIENTS asyncio clients (each its own httpx connection) run for DURATION seconds against one daemon:
GetVmInfo and ListVms of their customer's CREATED VMs, their own CreateVm/DeleteVm pairs, a hot VM
id per customer that many clients create and delete at once (racing: ALREADY_EXISTS/NOT_FOUND are
expected there), state-machine refusals (Pause/Resume/Reboot/Shutdown of CREATED VMs: 412), other
customers' VMs (403) and missing ones (404); two more clients boot, pause, resume, shut down and
delete real guests the whole time. Each call has a set of expected answers; anything else, and any
call without an answer within CALL_TIMEOUT (a deadlock), fails the test.

Memory: the daemon's RSS is sampled after a warm-up third, after the second third and at the end;
the last third may add at most RSS_GROWTH_BOUND. Justification: the daemon keeps no per-request
state (metrics have fixed label sets, one lock per existing VM, connections are open from the
start), so once every code path and connection buffer has been through the warm-up the resident
set only moves by allocator noise: pymalloc arenas are 1 MiB each and glibc keeps freed chunks, a
few MiB either way. A leak of even 1 KiB per request would add ~10 MiB per third at the rates seen
here (several thousand requests per third), so the bound still catches one.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.reliability.common import knob, wait_for
from tests.reliability.conftest import MakeDaemon
from tests.reliability.host import fd_growth, fd_kinds, rss_bytes, steady_fd_kinds
from tests.support.rpc import SERVICE, Rpc, token

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

DURATION = knob("LOAD_SECONDS", 18, 300)
CLIENTS = knob("LOAD_CLIENTS", 150, 200)
BOOTERS = 2
CUSTOMERS = 10
VMS_PER_CUSTOMER = 5
CALL_TIMEOUT = 60.0  # a call slower than this is taken for a deadlock (boots take ~1 s)
RSS_GROWTH_BOUND = 8 << 20


@dataclass
class Tally:
    answers: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def latencies(self) -> str:
        """p50/p99/max per method, in ms."""
        out = []
        for method, values in sorted(self.seconds.items()):
            v = sorted(values)
            p50, p99 = v[len(v) // 2], v[min(len(v) - 1, len(v) * 99 // 100)]
            out.append(f"{method} {p50 * 1000:.0f}/{p99 * 1000:.0f}/{v[-1] * 1000:.0f}")
        return ", ".join(out)


class Client:
    def __init__(self, url: str, customer: str, tally: Tally) -> None:
        self.customer = customer
        self.tally = tally
        self.http = httpx.AsyncClient(
            base_url=url,
            timeout=CALL_TIMEOUT,
            limits=httpx.Limits(max_connections=1),
            headers={"Authorization": f"Bearer {token(customer)}"},
        )

    async def call(self, method: str, body: dict[str, Any], expected: set[int]) -> dict[str, Any]:
        started = time.monotonic()
        try:
            resp = await self.http.post(f"/{SERVICE}/{method}", json=body)
        except httpx.TimeoutException:
            self.tally.unexpected.append(f"{method} {body}: no answer within {CALL_TIMEOUT:g}s")
            return {}
        except httpx.TransportError as exc:
            self.tally.unexpected.append(f"{method} {body}: {exc!r}")
            return {}
        self.tally.seconds.setdefault(method, []).append(time.monotonic() - started)
        self.tally.answers[f"{method} {resp.status_code}"] += 1
        if resp.status_code not in expected:
            self.tally.unexpected.append(f"{method} {body}: {resp.status_code} {resp.text[:200]}")
        try:
            data: dict[str, Any] = resp.json()
        except ValueError:
            return {}
        return data


async def reader_writer(client: Client, n: int, shared: dict[str, list[str]], deadline: float) -> None:
    rng = random.Random(n)
    mine = shared[client.customer]
    others = [vm for customer, vms in shared.items() if customer != client.customer for vm in vms]
    own_seq = 0
    while time.monotonic() < deadline:
        roll = rng.random()
        if roll < 0.35:
            info = await client.call("GetVmInfo", {"vm_id": rng.choice(mine)}, {200})
            if info and info.get("state") != "VM_STATE_CREATED":
                client.tally.unexpected.append(f"GetVmInfo: {info.get('vm_id')} is {info.get('state')}")
        elif roll < 0.55:
            body: dict[str, Any] = {"page_size": rng.randint(1, 50)}
            if rng.random() < 0.5:
                body["state_filter"] = ["VM_STATE_CREATED"]
            page = await client.call("ListVms", body, {200})
            if page and page.get("total_count", 0) < VMS_PER_CUSTOMER:
                client.tally.unexpected.append(f"ListVms total_count {page.get('total_count')}")
        elif roll < 0.67:  # a CreateVm/DeleteVm pair of the client's own
            own_seq += 1
            vm_id = f"load-{n}-{own_seq}"
            await client.call("CreateVm", {"vm_id": vm_id, "config": {}}, {200})
            await client.call("GetVmInfo", {"vm_id": vm_id}, {200})
            await client.call("DeleteVm", {"vm_id": vm_id}, {200})
        elif roll < 0.75:  # everyone of this customer fights over one id
            hot = f"hot-{client.customer}"
            if rng.random() < 0.5:
                await client.call("CreateVm", {"vm_id": hot, "config": {}}, {200, 409})
            else:
                await client.call("DeleteVm", {"vm_id": hot}, {200, 404})
        elif roll < 0.9:
            method = rng.choice(["PauseVm", "ResumeVm", "RebootVm", "ShutdownVm"])
            await client.call(method, {"vm_id": rng.choice(mine)}, {412})
        elif roll < 0.95:
            await client.call("GetVmInfo", {"vm_id": rng.choice(others)}, {403})
        else:
            await client.call("DeleteVm", {"vm_id": f"missing-{n}"}, {404})


async def booter(client: Client, n: int, deadline: float) -> int:
    """Real guests under the load: boot, pause, resume, shut down, delete."""
    cycles = 0
    while time.monotonic() < deadline:
        vm_id = f"boot-{n}-{cycles}"
        await client.call("CreateVm", {"vm_id": vm_id, "config": {}}, {200})
        await client.call("BootVm", {"vm_id": vm_id}, {200})
        info = await client.call("GetVmInfo", {"vm_id": vm_id}, {200})
        if info.get("state") != "VM_STATE_RUNNING" or not info.get("backend_info", {}).get("process_id"):
            client.tally.unexpected.append(f"booted {vm_id}: {info}")
        await client.call("PauseVm", {"vm_id": vm_id}, {200})
        await client.call("ResumeVm", {"vm_id": vm_id}, {200})
        await client.call("ShutdownVm", {"vm_id": vm_id, "force": True}, {200})
        await client.call("DeleteVm", {"vm_id": vm_id}, {200})
        cycles += 1
    return cycles


async def run_load(url: str, shared: dict[str, list[str]], pid: int) -> tuple[Tally, list[int], int]:
    tally = Tally()
    customers = sorted(shared)
    clients = [Client(url, customers[n % len(customers)], tally) for n in range(CLIENTS)]
    booters = [Client(url, f"load-boot-{n}", tally) for n in range(BOOTERS)]
    started = time.monotonic()
    deadline = started + DURATION
    rss: list[int] = []

    async def sample() -> None:
        for third in (1, 2, 3):
            await asyncio.sleep(max(0.0, started + third * DURATION / 3 - time.monotonic()))
            rss.append(rss_bytes(pid))

    tasks = [
        *(reader_writer(c, n, shared, deadline) for n, c in enumerate(clients)),
        *(booter(c, n, deadline) for n, c in enumerate(booters)),
        sample(),
    ]
    try:
        results = await asyncio.wait_for(asyncio.gather(*tasks), DURATION + CALL_TIMEOUT * 2)
    finally:
        for c in (*clients, *booters):
            await c.http.aclose()
    boots = sum(r for r in results if isinstance(r, int))
    return tally, rss, boots


def test_concurrent_clients_no_errors_no_deadlock_flat_memory(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon("--no-network-enabled", name="rel-lod")
    assert daemon.proc is not None
    pid = daemon.proc.pid
    shared: dict[str, list[str]] = {}
    for c in range(CUSTOMERS):
        rpc = Rpc(daemon.url, f"load-c{c}")
        shared[rpc.customer] = [rpc.create(vm_id=f"{rpc.customer}-{i}") for i in range(VMS_PER_CUSTOMER)]
        rpc.client.close()
    fds_before = steady_fd_kinds(pid, daemon.data_dir)
    rss_start = rss_bytes(pid)

    tally, rss, boots = asyncio.run(run_load(daemon.url, shared, pid))

    total = sum(tally.answers.values())
    print(
        f"{CLIENTS}+{BOOTERS} clients, {DURATION}s: {total} calls ({total / DURATION:.0f}/s), {boots} boots"
    )
    print(f"answers: {dict(sorted(tally.answers.items()))}")
    print(f"latency ms p50/p99/max: {tally.latencies()}")
    print(f"RSS MiB: start {rss_start / 2**20:.1f}, after each third {[round(r / 2**20, 1) for r in rss]}")
    assert not tally.unexpected, f"{len(tally.unexpected)} unexpected answers, e.g.:\n" + "\n".join(
        tally.unexpected[:20]
    )
    assert total >= 20 * DURATION, "the load did not get going"
    assert boots >= 1 and all(
        tally.answers[f"{m} 200"] for m in ("CreateVm", "DeleteVm", "GetVmInfo", "ListVms")
    )
    assert rss[2] - rss[1] <= RSS_GROWTH_BOUND, (
        f"RSS grew {(rss[2] - rss[1]) / 2**20:.1f} MiB in the last third"
    )

    # Afterwards: the daemon is well, holds no more fds than before, and the VMs are as they were.
    health = httpx.get(f"{daemon.url}/health", timeout=10)
    assert health.status_code == 200, health.text
    try:
        wait_for(lambda: not fd_growth(fds_before, fd_kinds(pid, daemon.data_dir)), 20, "daemon fds back")
    except AssertionError:
        raise AssertionError(
            f"daemon holds more fds than before: {fd_growth(fds_before, fd_kinds(pid, daemon.data_dir))}"
        ) from None
    for customer, vms in shared.items():
        listed = Rpc(daemon.url, customer).ok("ListVms", {"page_size": 100})
        assert sorted(v["vm_id"] for v in listed["vms"] if v["vm_id"] in vms) == sorted(vms)
