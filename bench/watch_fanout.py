"""WatchVms fan-out: VM events delivered per second to N concurrent watchers, and each delivery's
lag (the watcher's receipt minus the event's `at`, both on this host's clock).

Per level N (default 0, 1, 10, 100): a watcher process opens N WatchVms streams (Connect, binary
proto; one asyncio loop) from the last cursor of the level before, each ready once it has the
level's marker event; then the producer (this process) churns CreateVm + DeleteVm of guest-less
VMs (or, `--events pause-resume`, pauses and resumes one booted VM per loop), `--concurrency` at
a time, `--cycles` times (two events each), and creates an end marker.
Every watcher must receive exactly the 2 x cycles + 1 events of the level (checked). Reported:
deliveries/s in total (all deliveries / first event's `at` to the last receipt), events/s
written, lag p50/p99 over all deliveries and the worst watcher's p99, the daemon's CPU per
delivery, and that CPU less what writing the events costs (measured by level 0, the producer
without watchers): the fan-out's own cost per delivery. `python -m bench.watch_fanout
[--watchers 0,1,10,100] [--cycles 300] [--profile]`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from connectrpc.codec import proto_binary_codec

from bench.api_load import PROFILE_RATE, py_spy, summarise_profile
from bench.common import (
    CUSTOMER,
    bench_daemon,
    bench_rpc,
    cpu_seconds,
    daemon_pid,
    machine_context,
    parser,
    percentile,
    print_table,
    workdir,
    write_results,
)
from bench.layers import layer_shares
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.gen.vmprovisioner.v1.vm_connect import VmServiceClient
from tests.support.daemon import Daemon
from tests.support.rpc import token

HEADERS = {"authorization": f"Bearer {token(CUSTOMER)}"}


def _client(url: str) -> VmServiceClient:
    return VmServiceClient(url, codec=proto_binary_codec(), accept_compression=(), send_compression=None)


async def _watch(
    url: str, after: str, start_vm: str, end_vm: str, ready: asyncio.Queue[None]
) -> dict[str, Any]:
    """One watcher: ready at the marker's CREATED; then every event up to the end marker's."""
    lags: list[float] = []
    cursors: list[int] = []
    ats: list[float] = []
    async with _client(url) as client:
        stream = client.watch_vms(pb.WatchVmsRequest(after_cursor=after), headers=HEADERS)
        started = False
        async for event in stream:
            received = time.time()
            if not started:  # what came before the level's marker is not the level's
                if event.vm_id == start_vm:
                    started = True
                    await ready.put(None)
                continue
            lags.append(received - (event.at.seconds + event.at.nanos / 1e9))
            ats.append(event.at.seconds + event.at.nanos / 1e9)
            cursors.append(int(event.cursor))
            if event.vm_id == end_vm and event.type == pb.VmEventType.CREATED:
                break
    return {"lags": lags, "cursors": cursors, "first_at": min(ats), "last_receipt": time.time()}


async def _watchers(url: str, n: int, after: str, start_vm: str, end_vm: str, pipe: Connection) -> None:
    ready: asyncio.Queue[None] = asyncio.Queue()
    tasks = [asyncio.create_task(_watch(url, after, start_vm, end_vm, ready)) for _ in range(n)]
    pipe.send("open")
    for _ in range(n):
        await ready.get()
    pipe.send("ready")
    cpu = time.process_time()
    results = await asyncio.gather(*tasks)
    pipe.send((results, time.process_time() - cpu))


def watcher_process(url: str, n: int, after: str, start_vm: str, end_vm: str, pipe: Connection) -> None:
    asyncio.run(_watchers(url, n, after, start_vm, end_vm, pipe))


@dataclass(frozen=True)
class Load:
    """What the producer does per level: `cycles` pairs of calls (two events), `concurrency` loops
    at once, as fast as they go or (rate > 0) each pair started on a schedule of `rate` events/s.
    A pair is CreateVm + DeleteVm of a new guest-less VM, or, with `paused` (one booted VM per
    loop), PauseVm + ResumeVm of the loop's VM."""

    cycles: int
    concurrency: int
    rate: float = 0.0
    paused: tuple[str, ...] = ()


async def produce(url: str, load: Load, level: int) -> None:
    async with _client(url) as client:
        todo = iter(range(load.cycles))
        start = time.monotonic()

        async def pair(i: int, loop_no: int) -> None:
            if load.paused:
                vm_id = load.paused[loop_no]
                await client.pause_vm(pb.PauseVmRequest(vm_id=vm_id), headers=HEADERS)
                await client.resume_vm(pb.ResumeVmRequest(vm_id=vm_id), headers=HEADERS)
                return
            vm_id = f"fan-{level}-{i}"
            await client.create_vm(pb.CreateVmRequest(vm_id=vm_id, config=pb.VmConfig()), headers=HEADERS)
            await client.delete_vm(pb.DeleteVmRequest(vm_id=vm_id), headers=HEADERS)

        async def loop(loop_no: int) -> None:
            for i in todo:
                if load.rate > 0:
                    await asyncio.sleep(max(0.0, start + 2 * i / load.rate - time.monotonic()))
                await pair(i, loop_no)

        await asyncio.gather(*(loop(k) for k in range(load.concurrency)))


async def create(url: str, vm_id: str) -> None:
    async with _client(url) as client:
        await client.create_vm(pb.CreateVmRequest(vm_id=vm_id, config=pb.VmConfig()), headers=HEADERS)


def run_level(
    url: str, pid: int, n: int, after: str, load: Load, profile: Path | None = None
) -> dict[str, Any]:
    """One level; n = 0: the producer alone (what writing the events costs without watchers)."""
    if n == 0:
        return produce_only(url, pid, load)
    start_vm, end_vm = f"fan-start-{n}", f"fan-end-{n}"
    ours, theirs = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(
        target=watcher_process, args=(url, n, after, start_vm, end_vm, theirs)
    )
    proc.start()
    assert ours.recv() == "open"
    asyncio.run(create(url, start_vm))
    if not ours.poll(120):
        proc.kill()
        raise RuntimeError(f"{n} watchers did not all open within 120 s")
    assert ours.recv() == "ready"
    cpu_before = cpu_seconds(pid)
    spy = None
    if profile is not None:  # py-spy on the daemon while it writes and fans out the level's events
        argv = [py_spy(), "record", "--pid", str(pid), "--rate", str(PROFILE_RATE), "--format", "raw",
                "--nonblocking", "-o", str(profile)]  # fmt: skip
        spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.time()
    asyncio.run(produce(url, load, n))
    asyncio.run(create(url, end_vm))
    produced = time.time() - started
    watchers, watchers_cpu = ours.recv()
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
    daemon_cpu = cpu_seconds(pid) - cpu_before
    proc.join(30)

    expected = 2 * load.cycles + 1
    reference = watchers[0]["cursors"]
    for w in watchers:  # exactly once, the same events in the same order for everyone
        assert len(w["cursors"]) == expected and w["cursors"] == reference, (len(w["cursors"]), expected)
    lags_ms = [lag * 1000 for w in watchers for lag in w["lags"]]
    window = max(w["last_receipt"] for w in watchers) - min(w["first_at"] for w in watchers)
    deliveries = n * expected
    return {
        "watchers": n,
        "events": expected,
        "deliveries": deliveries,
        "deliveries_per_s": deliveries / window,
        "events_written_per_s": expected / produced,
        "window_s": window,
        "lag_ms_p50": percentile(lags_ms, 50),
        "lag_ms_p99": percentile(lags_ms, 99),
        "lag_ms_max": max(lags_ms),
        "worst_watcher_lag_ms_p99": max(percentile([x * 1000 for x in w["lags"]], 99) for w in watchers),
        "daemon_cpu_s": daemon_cpu,
        "watcher_process_busy_pct": 100 * watchers_cpu / window,  # near 100: the lag is partly the client's
        "daemon_cpu_us_per_delivery": daemon_cpu / deliveries * 1e6,
        "last_cursor": str(reference[-1]),
    }


def produce_only(url: str, pid: int, load: Load) -> dict[str, Any]:
    cpu_before, started = cpu_seconds(pid), time.time()
    asyncio.run(produce(url, load, 0))
    asyncio.run(create(url, "fan-end-0"))
    produced = time.time() - started
    events = 2 * load.cycles + 1
    return {
        "watchers": 0,
        "events": events,
        "deliveries": 0,
        "events_written_per_s": events / produced,
        "daemon_cpu_s": cpu_seconds(pid) - cpu_before,
    }


def add_fanout_cost(rows: list[dict[str, Any]]) -> None:
    """The daemon's CPU per delivery beyond writing the events (the watcher-less level's CPU per
    event written, subtracted), when that level ran."""
    alone = next((r for r in rows if r["watchers"] == 0), None)
    if alone is None:
        return
    per_event = alone["daemon_cpu_s"] / alone["events"]
    for row in rows:
        if row["deliveries"]:
            fanout = row["daemon_cpu_s"] - per_event * row["events"]
            row["fanout_cpu_us_per_delivery"] = fanout / row["deliveries"] * 1e6


def boot_vms(daemon: Daemon, count: int) -> tuple[str, ...]:
    """`count` booted default guests (to their ready line), one per producer loop."""
    rpc = bench_rpc(daemon)
    vm_ids = tuple(rpc.create({}, vm_id=f"fan-vm-{k}") for k in range(count))
    for vm_id in vm_ids:
        rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True, "wait_timeout_seconds": 300})
    return vm_ids


def main(argv: Sequence[str]) -> int:
    p = parser("watch_fanout", __doc__ or "")
    p.add_argument("--watchers", default="0,1,10,100", help="watcher counts, one level each (0: none)")
    p.add_argument("--cycles", type=int, default=300, help="CreateVm + DeleteVm pairs per level")
    p.add_argument("--concurrency", type=int, default=4, help="producer loops at once")
    p.add_argument("--rate", type=float, default=0.0, help="events/s to write (0: as fast as it goes)")
    p.add_argument("--profile", action="store_true", help="py-spy the daemon during the last level")
    p.add_argument(
        "--events",
        choices=("create-delete", "pause-resume"),
        default="create-delete",
        help="what makes the events: guest-less VMs made and deleted, or booted VMs (one per loop) "
        "paused and resumed (cheaper per event: higher rates)",
    )
    args = p.parse_args(argv)
    levels = [int(n) for n in args.watchers.split(",") if n]
    rows = []
    with workdir(args.workdir) as root, bench_daemon(root, args.assets_dir) as daemon:
        context = machine_context()
        pid = daemon_pid(daemon)
        paused = boot_vms(daemon, args.concurrency) if args.events == "pause-resume" else ()
        load = Load(args.cycles, args.concurrency, args.rate, paused)
        after = "0"
        profile: dict[str, Any] = {}
        for n in levels:
            raw = root / f"profile-{n}.txt" if args.profile and n == levels[-1] else None
            row = run_level(daemon.url, pid, n, after, load, raw)
            after = row.pop("last_cursor", after)
            rows.append(row)
            print(row, flush=True)
            if raw is not None and raw.exists():
                text = raw.read_text()
                profile = {
                    "watchers": n,
                    **layer_shares(text),
                    "top": summarise_profile(text, 1, PROFILE_RATE, 30),
                }
                print(profile, flush=True)
    add_fanout_cost(rows)
    columns = (
        ("deliveries/s", "deliveries_per_s", 0),
        ("written/s", "events_written_per_s", 0),
        ("lag p50 ms", "lag_ms_p50", 1),
        ("lag p99 ms", "lag_ms_p99", 1),
        ("worst p99 ms", "worst_watcher_lag_ms_p99", 1),
        ("cpu us/dlv", "daemon_cpu_us_per_delivery", 1),
        ("fan-out cpu us/dlv", "fanout_cpu_us_per_delivery", 1),
        ("watchers' cpu %", "watcher_process_busy_pct", 0),
    )
    print_table(
        "WatchVms fan-out",
        ["watchers", *(c[0] for c in columns)],
        [[r["watchers"], *(round(r[k], d) if k in r else "-" for _, k, d in columns)] for r in rows],
    )
    write_results("watch_fanout", argv, args, context, {"levels": rows, "profile": profile})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
