"""API throughput and latency: GetVmInfo and ListVms (page 50) with 10, 1,000 and 10,000 VMs stored.

The load comes from h2load (Debian's nghttp2-client), a separate C process, over cleartext HTTP/2 to the
daemon's one port, in three protocols: Connect JSON, Connect proto and gRPC. Two load shapes per case:
`load` (--clients x --streams requests in flight: throughput) and `1 client` (one request at a time:
latency of an unloaded daemon). p50/p99 come from h2load's per-request log.

The stored VMs are CREATED VMs of one customer, created through the API with --seed-concurrency calls in
flight (read-only root disk, so CreateVm makes no qcow2 overlay). GetVmInfo asks for one VM; ListVms
asks for the first page of 50 (its total_count counts all of the customer's VMs).

With --profile (default) the daemon is sampled with py-spy under the same load at the largest size, and
the hottest functions (inclusive and self, % of samples) are printed and stored.

    .venv/bin/python -m bench.api_load
    .venv/bin/python -m bench.api_load --sizes 10,1000,10000,50000 --duration 10
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx

from bench.common import (
    CUSTOMER,
    MIB,
    bench_daemon,
    bench_rpc,
    cpu_seconds,
    create_vms,
    daemon_pid,
    machine_context,
    parser,
    percentile,
    print_table,
    proc_status,
    workdir,
    write_results,
)
from metald.gen.vmprovisioner.v1 import vm_pb
from tests.support.daemon import Daemon
from tests.support.rpc import SERVICE, Rpc, token

NAME = "api_load"
GET_TARGET_RPS = 3000
LIST_TARGET_P50_MS = 5.0
LIST_PAGE = 50
SEED_CONFIG = {
    "memory": {"size_bytes": 128 * MIB},
    "storage": [
        {
            "device_id": "rootfs",
            "path_on_host": "/assets/rootfs.ext4",
            "is_read_only": True,
            "is_root_device": True,
        }
    ],
    "metadata": {"team": "bench", "purpose": "api-load"},
}


@dataclass(frozen=True)
class Protocol:
    name: str
    headers: tuple[str, ...]
    encode: Callable[[Any], bytes]  # request message -> HTTP request body


def _grpc_frame(message: Any) -> bytes:
    payload: bytes = message.to_binary()
    return b"\0" + struct.pack(">I", len(payload)) + payload


PROTOCOLS = (
    Protocol(
        "connect-json",
        ("content-type: application/json",),
        lambda m: str(m.to_json(use_proto_field_name=True)).encode(),
    ),
    Protocol("connect-proto", ("content-type: application/proto",), lambda m: bytes(m.to_binary())),
    Protocol("grpc", ("content-type: application/grpc", "te: trailers"), _grpc_frame),
)


@dataclass(frozen=True)
class Shape:
    name: str
    clients: int
    streams: int  # concurrent streams per client (HTTP/2 multiplexing)


@dataclass(frozen=True)
class LoadResult:
    stored: int
    rpc: str
    protocol: str
    shape: str
    in_flight: int
    requests: int
    failed: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    daemon_cpu_pct: float  # CPU time the daemon used over the run / wall time (100 = one core)
    cpu_ms_per_req: float  # daemon CPU per request: the load-independent cost

    @property
    def req_per_cpu_s(self) -> float:
        """What the daemon would serve with one whole core to itself."""
        return 1000 / self.cpu_ms_per_req if self.cpu_ms_per_req else 0.0


# ---- the load generator -------------------------------------------------------------------------


def h2load_argv(
    url: str, rpc: str, proto: Protocol, body: Path, shape: Shape, seconds: float, warm_up: float = 1
) -> list[str]:
    headers = [f"authorization: Bearer {token(CUSTOMER)}", *proto.headers]
    return [
        "h2load",
        *(
            "-D",
            f"{round(seconds * 1000)}ms",
            *(("--warm-up-time", f"{round(warm_up * 1000)}ms") if warm_up else ()),
        ),
        *("-c", str(shape.clients), "-m", str(shape.streams), "-t", "1"),
        *(arg for h in headers for arg in ("-H", h)),
        *("-d", str(body)),
        f"{url}/{SERVICE}/{rpc}",
    ]


def parse_h2load(stdout: str, log: Path) -> tuple[int, int, float, list[float]]:
    """(requests done, failed or errored, req/s, per-request latencies in ms) of the measured phase."""
    rps = float(_match(r"finished in [\d.]+\w+, ([\d.]+) req/s", stdout))
    done, succeeded = (
        int(x) for x in _match(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", stdout, 2)
    )
    latencies = [int(line.split("\t")[2]) / 1000 for line in log.read_text().splitlines() if line.strip()]
    return done, done - succeeded, rps, latencies


def _match(pattern: str, text: str, groups: int = 1) -> Any:
    m = re.search(pattern, text)
    if m is None:
        raise RuntimeError(f"h2load output not understood ({pattern!r}):\n{text}")
    return m.group(1) if groups == 1 else m.groups()


def run_load(
    daemon: Daemon, rpc: str, proto: Protocol, body: Path, shape: Shape, seconds: float, stored: int
) -> LoadResult:
    """One h2load run; the daemon's CPU time is read around it (warm-up included: the same load)."""
    log = body.with_suffix(".log")
    log.unlink(missing_ok=True)
    argv = [*h2load_argv(daemon.url, rpc, proto, body, shape, seconds), "--log-file", str(log)]
    cpu_before, started = cpu_seconds(daemon_pid(daemon)), time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=True).stdout
    cpu = (cpu_seconds(daemon_pid(daemon)) - cpu_before) / (time.monotonic() - started)
    done, failed, rps, latencies = parse_h2load(out, log)
    return LoadResult(
        stored=stored,
        rpc=rpc,
        protocol=proto.name,
        shape=shape.name,
        in_flight=shape.clients * shape.streams,
        requests=done,
        failed=failed,
        req_per_s=rps,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        daemon_cpu_pct=round(100 * cpu, 1),
        cpu_ms_per_req=round(1000 * cpu / rps, 3) if rps else 0.0,
    )


# ---- requests, checked once by independent clients before any load ------------------------------------


def check_request(url: str, rpc: str, proto: Protocol, request: Any, response_type: Any) -> Any:
    """Send the exact request body once (grpcio for gRPC, httpx for Connect); return the decoded response."""
    metadata = (("authorization", f"Bearer {token(CUSTOMER)}"),)
    if proto.name == "grpc":
        with grpc.insecure_channel(url.removeprefix("http://")) as channel:
            call = channel.unary_unary(f"/{SERVICE}/{rpc}")
            return response_type.from_binary(call(request.to_binary(), metadata=metadata, timeout=30))
    content_type = proto.headers[0].split(": ", 1)[1]
    resp = httpx.post(
        f"{url}/{SERVICE}/{rpc}",
        content=proto.encode(request),
        headers={"authorization": metadata[0][1], "content-type": content_type},
        timeout=30,
    )
    if resp.status_code != 200:
        raise RuntimeError(f"{rpc} over {proto.name}: HTTP {resp.status_code} {resp.text[:500]}")
    if proto.name == "connect-json":
        return response_type.from_json(resp.text)
    return response_type.from_binary(resp.content)


def write_bodies(daemon: Daemon, root: Path, vm_id: str, stored: int) -> dict[tuple[str, str], Path]:
    """One body file per (rpc, protocol), each checked to give the right answer."""
    cases: dict[str, tuple[Any, Any, Callable[[Any], bool]]] = {
        "GetVmInfo": (
            vm_pb.GetVmInfoRequest(vm_id=vm_id),
            vm_pb.GetVmInfoResponse,
            lambda r: r.vm_id == vm_id,
        ),
        "ListVms": (
            vm_pb.ListVmsRequest(page_size=LIST_PAGE),
            vm_pb.ListVmsResponse,
            lambda r: len(r.vms) == min(LIST_PAGE, stored) and r.total_count == stored,
        ),
    }
    bodies = {}
    for rpc, (request, response_type, good) in cases.items():
        for proto in PROTOCOLS:
            if not good(check_request(daemon.url, rpc, proto, request, response_type)):
                raise RuntimeError(f"{rpc} over {proto.name} gave an unexpected answer")
            path = root / f"{rpc}-{proto.name}.body"
            path.write_bytes(proto.encode(request))
            bodies[(rpc, proto.name)] = path
    return bodies


# ---- profiling ------------------------------------------------------------------------------------


# Frames every event-loop sample passes through (interpreter start, asyncio's loop, the CLI).
_ROOT_FRAMES = (
    "<frozen runpy>",
    "asyncio/runners.py",
    "asyncio/base_events.py",
    "asyncio/events.py",
    "metald/cli/",
)


def _frame_key(frame: str) -> str:
    """'get_vm_info (metald/api/handlers.py:45)' -> 'metald/api/handlers.py:get_vm_info'."""
    func, _, where = frame.partition(" (")
    return f"{where.rsplit(':', 1)[0]}:{func}" if where else func


def summarise_profile(raw: str, seconds: float, rate: int, top: int) -> dict[str, Any]:
    """Inclusive and self shares of py-spy's collapsed stacks (% of all samples of busy threads)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = loop = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        keys = [_frame_key(f) for f in stack.split(";")]
        total += n
        loop += n if "threading.py:Thread._bootstrap" not in keys[0] else 0
        for key in set(keys):
            inclusive[key] += n
        own[keys[-1]] += n

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(top)]

    for key in [k for k in inclusive if k.startswith(_ROOT_FRAMES)]:
        del inclusive[key]
    return {
        "samples": total,
        "event_loop_busy_pct": round(100 * loop / (seconds * rate), 1),
        "inclusive_pct": share(inclusive),
        "self_pct": share(own),
    }


def py_spy() -> str:
    """py-spy from the venv (a dev extra) or PATH."""
    found = shutil.which(
        "py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if found is None:
        raise SystemExit("py-spy not found: pip install py-spy (or run with --no-profile)")
    return found


PROFILE_RATE = 250  # py-spy samples per second


def record_profile(
    url: str, pid: int, raw: Path, rpc: str, proto: Protocol, body: Path, shape: Shape, seconds: float
) -> str:
    """py-spy on process `pid` for `seconds` while h2load keeps it busy; its collapsed stacks."""
    load = subprocess.Popen(
        h2load_argv(url, rpc, proto, body, shape, seconds + 2),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.5)  # past h2load's warm-up
        subprocess.run(
            [
                py_spy(),
                "record",
                "--pid",
                str(pid),
                "--duration",
                f"{seconds:g}",
                "--rate",
                str(PROFILE_RATE),
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(raw),
            ],
            capture_output=True,
            check=True,
            timeout=seconds + 60,
        )
    finally:
        load.wait(timeout=seconds + 60)
    return raw.read_text()


def profile_load(
    daemon: Daemon, root: Path, rpc: str, proto: Protocol, body: Path, shape: Shape, seconds: float, top: int
) -> dict[str, Any]:
    """py-spy on the daemon for `seconds` while h2load keeps it busy."""
    raw = root / f"profile-{rpc}-{proto.name}.txt"
    text = record_profile(daemon.url, daemon_pid(daemon), raw, rpc, proto, body, shape, seconds)
    return {"rpc": rpc, "protocol": proto.name, **summarise_profile(text, seconds, PROFILE_RATE, top)}


# ---- the benchmark --------------------------------------------------------------------------------


def seed(rpc: Rpc, have: int, want: int, concurrency: int) -> dict[str, float]:
    started = time.monotonic()
    create_vms(rpc, want - have, SEED_CONFIG, concurrency)
    elapsed = time.monotonic() - started
    return {
        "created": want - have,
        "seconds": round(elapsed, 2),
        "creates_per_s": round((want - have) / elapsed, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser(NAME, "GetVmInfo / ListVms throughput and latency over Connect JSON, Connect proto, gRPC.")
    p.add_argument("--sizes", default="10,1000,10000", help="VMs stored, comma-separated, ascending")
    p.add_argument("--duration", type=float, default=3.0, help="seconds of load per case (after 1 s warm-up)")
    p.add_argument("--clients", type=int, default=4, help="HTTP/2 connections of the `load` shape")
    p.add_argument("--streams", type=int, default=4, help="requests in flight per connection (`load`)")
    p.add_argument("--seed-concurrency", type=int, default=16, help="CreateVm calls in flight while seeding")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True, help="py-spy the daemon")
    p.add_argument("--profile-seconds", type=float, default=8.0)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    shapes = (Shape("load", args.clients, args.streams), Shape("1 client", 1, 1))
    context = machine_context()
    results: list[LoadResult] = []
    seeding: list[dict[str, float]] = []
    daemon_rss: dict[int, int] = {}
    profiles: list[dict[str, Any]] = []
    limits = ["--max-vms-per-customer", "0", "--max-vms", "0"]
    with workdir(args.workdir) as root, bench_daemon(root, args.assets_dir, *limits) as daemon:
        rpc = bench_rpc(daemon)
        have = 0
        first_vm = ""
        for stored in sizes:
            seeding.append({"stored": stored, **seed(rpc, have, stored, args.seed_concurrency)})
            print(f"stored {stored} VMs (+{stored - have} in {seeding[-1]['seconds']} s)")
            have = stored
            first_vm = first_vm or rpc.ok("ListVms", {"page_size": 1})["vms"][0]["vm_id"]
            bodies = write_bodies(daemon, root, first_vm, stored)
            for (rpc_name, proto_name), body in bodies.items():
                proto = next(p for p in PROTOCOLS if p.name == proto_name)
                for shape in shapes:
                    r = run_load(daemon, rpc_name, proto, body, shape, args.duration, stored)
                    results.append(r)
                    print(
                        f"  {rpc_name:<9} {proto_name:<13} {shape.name:<8} {r.req_per_s:7.0f} req/s"
                        f"  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  failed {r.failed}"
                    )
            daemon_rss[stored] = proc_status(daemon_pid(daemon)).get("VmRSS", 0)
        if args.profile:
            for rpc_name in ("GetVmInfo", "ListVms"):
                for proto in (PROTOCOLS[0], PROTOCOLS[2]):
                    prof = profile_load(
                        daemon,
                        root,
                        rpc_name,
                        proto,
                        bodies[(rpc_name, proto.name)],
                        shapes[0],
                        args.profile_seconds,
                        top=40,
                    )
                    profiles.append(prof)
    report(results, seeding, daemon_rss, profiles, shapes)
    write_results(
        NAME,
        argv,
        args,
        context,
        {
            "load": [{**asdict(r), "req_per_cpu_s": round(r.req_per_cpu_s)} for r in results],
            "seeding": seeding,
            "daemon_rss_kib": daemon_rss,
            "targets": targets(results, max(sizes)),
            "profiles": profiles,
        },
    )
    return 0


def targets(results: Sequence[LoadResult], largest: int) -> dict[str, Any]:
    """GetVmInfo >= 3,000 req/s (best protocol, `load` shape); ListVms p50 <= 5 ms at the largest size."""
    get = [r for r in results if r.rpc == "GetVmInfo" and r.shape == "load"]
    lists = [r for r in results if r.rpc == "ListVms" and r.stored == largest]
    best_get = max(get, key=lambda r: r.req_per_s)
    return {
        "get_vm_info_req_per_s": {r.protocol + f"@{r.stored}": r.req_per_s for r in get},
        "get_vm_info_best": best_get.req_per_s,
        "get_vm_info_target": GET_TARGET_RPS,
        "get_vm_info_met": best_get.req_per_s >= GET_TARGET_RPS,
        "list_vms_p50_ms": {f"{r.protocol}/{r.shape}": r.p50_ms for r in lists},
        "list_vms_target_p50_ms": LIST_TARGET_P50_MS,
        "list_vms_met_1_client": all(r.p50_ms <= LIST_TARGET_P50_MS for r in lists if r.shape == "1 client"),
        "list_vms_met_load": all(r.p50_ms <= LIST_TARGET_P50_MS for r in lists if r.shape == "load"),
    }


def report(
    results: Sequence[LoadResult],
    seeding: Sequence[dict[str, float]],
    daemon_rss: dict[int, int],
    profiles: Sequence[dict[str, Any]],
    shapes: Sequence[Shape],
) -> None:
    for shape in shapes:
        print_table(
            f"{shape.name}: {shape.clients} connection(s) x {shape.streams} stream(s) over h2c from h2load",
            [
                "stored",
                "rpc",
                "protocol",
                "req/s",
                "p50 ms",
                "p99 ms",
                "daemon CPU %",
                "CPU ms/req",
                "req/CPU-s",
            ],
            [
                (
                    r.stored,
                    r.rpc,
                    r.protocol,
                    r.req_per_s,
                    r.p50_ms,
                    r.p99_ms,
                    r.daemon_cpu_pct,
                    r.cpu_ms_per_req,
                    r.req_per_cpu_s,
                )
                for r in results
                if r.shape == shape.name
            ],
        )
    print_table(
        "Seeding through CreateVm",
        ["stored", "created", "seconds", "creates/s", "daemon RSS MiB"],
        [
            (s["stored"], s["created"], s["seconds"], s["creates_per_s"], daemon_rss[int(s["stored"])] / 1024)
            for s in seeding
        ],
    )
    for prof in profiles:
        title = f"py-spy: {prof['rpc']} over {prof['protocol']}, {prof['samples']} samples"
        print_table(
            f"{title}, event loop busy {prof['event_loop_busy_pct']}% (inclusive % of samples)",
            ["%", "function"],
            [(pct, key) for key, pct in prof["inclusive_pct"][:20]],
        )
        print_table(
            f"{title} (self %)", ["%", "function"], [(pct, key) for key, pct in prof["self_pct"][:12]]
        )


if __name__ == "__main__":
    sys.exit(main())
