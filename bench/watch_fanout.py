"""WatchVms fan-out: VM events delivered per second to N concurrent watchers, and each delivery's
lag (the watcher's receipt minus the event's `at`, both on this host's clock).

Per level N (default 1, 10, 100): a watcher process opens N WatchVms streams (Connect, binary
proto; one asyncio loop) from the last cursor of the level before, each ready once it has the
level's marker event; then the producer (this process) churns CreateVm + DeleteVm of guest-less
VMs, `--concurrency` at a time, `--cycles` times (two events each), and creates an end marker.
Every watcher must receive exactly the 2 x cycles + 1 events of the level (checked). Reported:
deliveries/s in total (all deliveries / first event's `at` to the last receipt), events/s
written, lag p50/p99 over all deliveries and the worst watcher's p99, and the daemon's CPU per
delivery. `python -m bench.watch_fanout [--watchers 1,10,100] [--cycles 300]`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from connectrpc.codec import proto_binary_codec

from bench.api_load import PROFILE_RATE, py_spy, summarise_profile
from bench.common import (
    CUSTOMER,
    bench_daemon,
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
        async for event in stream:
            received = time.time()
            if event.vm_id == start_vm:
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
    pipe.send(await asyncio.gather(*tasks))


def watcher_process(url: str, n: int, after: str, start_vm: str, end_vm: str, pipe: Connection) -> None:
    asyncio.run(_watchers(url, n, after, start_vm, end_vm, pipe))


async def produce(url: str, cycles: int, concurrency: int, level: int) -> None:
    """`cycles` CreateVm + DeleteVm, `concurrency` loops at once."""
    async with _client(url) as client:
        todo = iter(range(cycles))

        async def loop() -> None:
            for i in todo:
                vm_id = f"fan-{level}-{i}"
                await client.create_vm(pb.CreateVmRequest(vm_id=vm_id, config=pb.VmConfig()), headers=HEADERS)
                await client.delete_vm(pb.DeleteVmRequest(vm_id=vm_id), headers=HEADERS)

        await asyncio.gather(*(loop() for _ in range(concurrency)))


async def create(url: str, vm_id: str) -> None:
    async with _client(url) as client:
        await client.create_vm(pb.CreateVmRequest(vm_id=vm_id, config=pb.VmConfig()), headers=HEADERS)


def run_level(
    url: str, pid: int, n: int, after: str, cycles: int, concurrency: int, profile: Path | None = None
) -> dict[str, Any]:
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
    asyncio.run(produce(url, cycles, concurrency, n))
    asyncio.run(create(url, end_vm))
    produced = time.time() - started
    watchers: list[dict[str, Any]] = ours.recv()
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
    daemon_cpu = cpu_seconds(pid) - cpu_before
    proc.join(30)

    expected = 2 * cycles + 1
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
        "daemon_cpu_us_per_delivery": daemon_cpu / deliveries * 1e6,
        "last_cursor": str(reference[-1]),
    }


def main(argv: Sequence[str]) -> int:
    p = parser("watch_fanout", __doc__ or "")
    p.add_argument("--watchers", default="1,10,100", help="comma-separated watcher counts, one level each")
    p.add_argument("--cycles", type=int, default=300, help="CreateVm + DeleteVm pairs per level")
    p.add_argument("--concurrency", type=int, default=4, help="producer loops at once")
    p.add_argument("--profile", action="store_true", help="py-spy the daemon during the last level")
    args = p.parse_args(argv)
    levels = [int(n) for n in args.watchers.split(",") if n]
    rows = []
    with workdir(args.workdir) as root, bench_daemon(root, args.assets_dir) as daemon:
        context = machine_context()
        pid = daemon_pid(daemon)
        after = "0"
        profile: dict[str, Any] = {}
        for n in levels:
            raw = root / f"profile-{n}.txt" if args.profile and n == levels[-1] else None
            row = run_level(daemon.url, pid, n, after, args.cycles, args.concurrency, raw)
            after = row.pop("last_cursor")
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
    print_table(
        "WatchVms fan-out",
        ["watchers", "deliveries/s", "written/s", "lag p50 ms", "lag p99 ms", "worst p99 ms", "cpu us/dlv"],
        [
            [
                r["watchers"],
                round(r["deliveries_per_s"]),
                round(r["events_written_per_s"]),
                round(r["lag_ms_p50"], 1),
                round(r["lag_ms_p99"], 1),
                round(r["worst_watcher_lag_ms_p99"], 1),
                round(r["daemon_cpu_us_per_delivery"], 1),
            ]
            for r in rows
        ],
    )
    write_results("watch_fanout", argv, args, context, {"levels": rows, "profile": profile})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
