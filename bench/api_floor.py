"""The API beside its framework floor: daemon CPU per GetVmInfo and per ListVms page, and their latency.

Two servers answer the same requests in the same run, in alternating order, round by round:
- `daemon`: a real `metald serve` with networking, holding one RUNNING VM with a NIC (the one
  GetVmInfo asks about: QMP, /proc, link counters) and as many stored VMs as --sizes says;
- `floor`: bench.floor_app, the same server stack with a handler that returns the daemon's own
  answer (decoded once, re-encoded per call): what any handler costs in this stack;
- `bare` (with --sides): connectrpc's application alone on the same server, without the daemon's
  middleware and interceptors;
- `daemon-pyvoy`, `floor-pyvoy`, `bare-pyvoy` (with --sides): the same three served by pyvoy's
  Envoy (`metald serve --server pyvoy`; `pip install pyvoy==1.3.0`).

The stored VMs beyond the running one are copies of a CreateVm'd row written straight into the
daemon's SQLite file (half CREATED, half SHUTDOWN); ListVms asks for page 50 filtered by SHUTDOWN.

What is measured does not depend on how busy the shared host is: the CPU time (utime + stime of
the server process, plus that of children it reaped: `ip` and the like) per request, over an h2load
run. Throughput and latency are reported too, each with the load average at the time. Every
ratio pairs runs of one round, which ran back to back.

    .venv/bin/python -m bench.api_floor                 # 10, 1,000, 10,000 stored; 2 rounds
    .venv/bin/python -m bench.api_floor --quick         # 10,000 stored, 1 round, 1 s per run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.api_load import (
    PROFILE_RATE,
    PROTOCOLS,
    SEED_CONFIG,
    Protocol,
    Shape,
    check_request,
    h2load_argv,
    parse_h2load,
    record_profile,
    summarise_profile,
)
from bench.common import (
    MIB,
    bench_rpc,
    machine_context,
    median,
    parser,
    percentile,
    print_table,
    workdir,
    write_results,
)
from bench.layers import layer_shares
from metald.domain import ids
from metald.domain.states import VmState
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from tests.reliability.conftest import own_daemon
from tests.support.daemon import REPO, free_port

NAME = "api_floor"
GET_TARGET_CPU_MS = 0.33  # 3,000 req/s on one core
LIST_TARGET_P50_MS = 3.0
FLOOR_RATIO_AIM = 0.5
LIST_PAGE = 50
LIST_FILTER = (pb.VmState.SHUTDOWN,)
RUNNING_CONFIG = {
    "cpu": {"vcpu_count": 1},
    "memory": {"size_bytes": 256 * MIB},
    "network": [{"interface_id": "eth0"}],
    "metadata": {"team": "bench", "purpose": "api-floor"},
}
SIDES = ("daemon", "floor", "bare", "daemon-pyvoy", "floor-pyvoy", "bare-pyvoy")
DAEMONS = {"daemon": "hypercorn", "daemon-pyvoy": "pyvoy"}
# (floor side, daemon side) pairs whose CPU ratio is reported: how close to its floor a daemon is
PAIRS = (
    ("floor", "daemon"),
    ("bare", "daemon"),
    ("floor-pyvoy", "daemon"),
    ("bare-pyvoy", "daemon"),
    ("floor-pyvoy", "daemon-pyvoy"),
)


@dataclass(frozen=True)
class Run:
    stored: int
    rpc: str
    protocol: str
    shape: str
    side: str
    round: int
    requests: int
    failed: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_req: float  # the server's CPU per request (its own + reaped children)
    child_cpu_ms_per_req: float  # of which in reaped children (the `ip` spawns)
    cpu_pct: float  # server CPU / wall time (100 = one core)
    loadavg_1m: float  # the host's, at the end of the run


# ---- servers --------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    url: str
    pid: int


def process_cpu(pid: int) -> tuple[float, float]:
    """(own utime + stime, reaped children's cutime + cstime) of a process, seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rindex(b")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


@contextlib.contextmanager
def floor_server(root: Path, responses: Path, name: str) -> Iterator[Server]:
    """A floor side: `floor` or `bare`, on hypercorn or (`-pyvoy`) on pyvoy, whose Envoy child
    process is the one measured."""
    port = free_port()
    kind, _, server = name.partition("-")
    argv = [sys.executable, "-m", "bench.floor_app", "--listen", f"127.0.0.1:{port}", "--responses"]
    argv += [str(responses), *(["--bare"] if kind == "bare" else []), "--server", server or "hypercorn"]
    with (root / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_listening(proc, url)
        yield Server(name, url, only_child(proc.pid) if server else proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def only_child(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"expected one child process of {pid}, found {children}")
    return int(children[0])


def wait_listening(proc: subprocess.Popen[bytes], url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"floor server exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{url}/", timeout=2)
            return
        time.sleep(0.1)
    raise RuntimeError(f"floor server did not answer within {timeout}s")


# ---- the stored VMs --------------------------------------------------------------------------------


def seed_rows(db_path: Path, template_vm: str, want: int) -> int:
    """Copies of the template's row until the store holds `want` VMs: alternately SHUTDOWN and
    CREATED, new ids, the template's config. Returns how many SHUTDOWN VMs are stored."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as db, db:
        have = int(db.execute("SELECT COUNT(*) FROM vms").fetchone()[0])
        cols = "customer_id, config, vcpus, memory_bytes, created_at, updated_at"
        template = db.execute(f"SELECT {cols} FROM vms WHERE vm_id = ?", (template_vm,)).fetchone()
        rows = []
        for i in range(have, want):
            state = VmState.SHUTDOWN if i % 2 == 0 else VmState.CREATED
            customer, config, vcpus, memory, created, updated = template
            rows.append((ids.new_vm_id(), customer, int(state), config, vcpus, memory, created, updated))
        db.executemany(
            f"INSERT INTO vms (vm_id, state, {cols}) VALUES (?,?,?,?,?,?,?,?)",
            [(r[0], r[2], r[1], *r[3:]) for r in rows],
        )
        return int(db.execute("SELECT COUNT(*) FROM vms WHERE state = 4").fetchone()[0])


def requests_for(vm_id: str) -> dict[str, Any]:
    return {
        "GetVmInfo": pb.GetVmInfoRequest(vm_id=vm_id),
        "ListVms": pb.ListVmsRequest(page_size=LIST_PAGE, state_filter=list(LIST_FILTER)),
    }


def capture(url: str, vm_id: str, shutdown_count: int, out: Path) -> dict[str, int]:
    """The daemon's answers, checked and written as the floor's constant responses; their sizes."""
    proto = next(p for p in PROTOCOLS if p.name == "connect-proto")
    info = check_request(url, "GetVmInfo", proto, requests_for(vm_id)["GetVmInfo"], pb.GetVmInfoResponse)
    page = check_request(url, "ListVms", proto, requests_for(vm_id)["ListVms"], pb.ListVmsResponse)
    if info.state != pb.VmState.RUNNING or not info.network_info or not info.network_info.interfaces:
        raise RuntimeError(f"GetVmInfo: not a running VM with a NIC: {info.to_json()[:500]}")
    if len(page.vms) != min(LIST_PAGE, shutdown_count) or page.total_count != shutdown_count:
        raise RuntimeError(f"ListVms: {len(page.vms)} VMs, total {page.total_count}, want {shutdown_count}")
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, message in (("GetVmInfo", info), ("ListVms", page)):
        data = message.to_binary()
        (out / f"{name}.bin").write_bytes(data)
        sizes[name] = len(data)
    return sizes


def check_floor(server: Server, responses: Path) -> None:
    """The floor answers what the daemon answered (equal messages: map order may differ)."""
    for proto in PROTOCOLS:
        for rpc, rtype in (("GetVmInfo", pb.GetVmInfoResponse), ("ListVms", pb.ListVmsResponse)):
            got = check_request(server.url, rpc, proto, requests_for("vm_x")[rpc], rtype)
            if got != rtype.from_binary((responses / f"{rpc}.bin").read_bytes()):
                raise RuntimeError(f"{server.name} answers {rpc} over {proto.name} differently")


# ---- one measured run -----------------------------------------------------------------------------


def measure(
    server: Server, rpc: str, proto: Protocol, body: Path, shape: Shape, seconds: float, meta: dict[str, Any]
) -> Run:
    log = body.with_name(f"{body.stem}-{server.name}.log")
    log.unlink(missing_ok=True)
    argv = [*h2load_argv(server.url, rpc, proto, body, shape, seconds, warm_up=0), "--log-file", str(log)]
    (own0, kids0), started = process_cpu(server.pid), time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=True).stdout
    (own1, kids1), wall = process_cpu(server.pid), time.monotonic() - started
    done, failed, rps, latencies = parse_h2load(out, log)
    total = max(1, done)  # no warm-up phase: the CPU window holds exactly these requests
    cpu = (own1 - own0) + (kids1 - kids0)
    return Run(
        **meta,
        side=server.name,
        requests=done,
        failed=failed,
        req_per_s=round(rps, 1),
        p50_ms=round(percentile(latencies, 50), 3) if latencies else 0.0,
        p99_ms=round(percentile(latencies, 99), 3) if latencies else 0.0,
        cpu_ms_per_req=round(1000 * cpu / total, 4),
        child_cpu_ms_per_req=round(1000 * (kids1 - kids0) / total, 4),
        cpu_pct=round(100 * cpu / wall, 1),
        loadavg_1m=os.getloadavg()[0],
    )


def rotated(sides: Sequence[Server], i: int) -> list[Server]:
    k = i % len(sides)
    return [*sides[k:], *sides[:k]]


# ---- the benchmark --------------------------------------------------------------------------------


@contextlib.contextmanager
def stocked_daemon(
    data_dir: Path, assets: Path, stored: int, index: int, side: str = "daemon"
) -> Iterator[tuple[Server, str, int]]:
    """A daemon of its own for one size: one RUNNING VM with a NIC (booted through the API), a
    CreateVm'd template, and copies of the template written into its SQLite file while the daemon
    is stopped (it keeps records and counts between its own writes: docs/store.md)."""
    flags = ("--max-vms-per-customer", "0", "--max-vms", "0", "--server", DAEMONS[side])
    with own_daemon(data_dir, assets.resolve(), *flags, name=f"bench-{index:03d}") as daemon:
        rpc = bench_rpc(daemon)
        running, template = rpc.create(RUNNING_CONFIG), rpc.create(dict(SEED_CONFIG))
        rpc.client.close()
        daemon.stop()
        shutdown = seed_rows(daemon.data_dir / "metald.db", template, stored)
        daemon.start()
        assert daemon.proc is not None
        bench_rpc(daemon).ok(
            "BootVm", {"vm_id": running, "wait_for_ready": True, "wait_timeout_seconds": 300}
        )
        yield Server(side, daemon.url, daemon.proc.pid), running, shutdown


def write_bodies(root: Path, vm_id: str) -> dict[tuple[str, str], Path]:
    bodies = {}
    for rpc, request in requests_for(vm_id).items():
        for proto in PROTOCOLS:
            path = root / f"{rpc}-{proto.name}.body"
            path.write_bytes(proto.encode(request))
            bodies[(rpc, proto.name)] = path
    return bodies


@contextlib.contextmanager
def servers_for(
    root: Path, responses: Path, daemons: dict[str, Server], sides: Sequence[str]
) -> Iterator[list[Server]]:
    with contextlib.ExitStack() as stack:
        out = []
        for side in sides:
            if side in DAEMONS:
                out.append(daemons[side])
            else:
                server = stack.enter_context(floor_server(root, responses, side))
                check_floor(server, responses)
                out.append(server)
        yield out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser(NAME, "Daemon CPU per GetVmInfo / ListVms page beside the framework floor, per protocol.")
    p.add_argument("--sizes", default="10,1000,10000", help="VMs stored, comma-separated, ascending")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per h2load run")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per case")
    p.add_argument("--sides", default="daemon,floor", help=f"of {','.join(SIDES)}")
    p.add_argument("--clients", type=int, default=4, help="HTTP/2 connections of the `load` shape")
    p.add_argument("--streams", type=int, default=4, help="requests in flight per connection (`load`)")
    p.add_argument("--quick", action="store_true", help="10,000 stored, 1 round, 1 s runs")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True, help="py-spy by layer")
    p.add_argument("--profile-seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds, args.duration = "10000", 1, 1.0
    sizes = [int(s) for s in args.sizes.split(",")]
    sides = [s for s in args.sides.split(",") if s]
    shapes = (Shape("load", args.clients, args.streams), Shape("1 client", 1, 1))
    context = machine_context()
    runs: list[Run] = []
    profiles: list[dict[str, Any]] = []
    sizes_bytes: dict[int, dict[str, int]] = {}
    with workdir(args.workdir) as root:
        for i, stored in enumerate(sizes):
            with contextlib.ExitStack() as daemons_stack:
                daemons: dict[str, Server] = {}
                bodies_of: dict[str, dict[tuple[str, str], Path]] = {}
                responses = root / f"responses-{stored}"
                for k, side in enumerate(s for s in DAEMONS if s in sides):
                    server, running, shutdown = daemons_stack.enter_context(
                        stocked_daemon(root / f"{side}-{stored}", args.assets_dir, stored, 2 * i + k, side)
                    )
                    daemons[side] = server
                    (root / side).mkdir(exist_ok=True)
                    bodies_of[side] = write_bodies(root / side, running)
                    sizes_bytes[stored] = capture(server.url, running, shutdown, responses)
                    print(
                        f"{side}: stored {stored} VMs ({shutdown} SHUTDOWN); response bytes {sizes_bytes[stored]}",
                        flush=True,
                    )
                first = next(iter(bodies_of.values()))
                with servers_for(root, responses, daemons, sides) as servers:
                    for server in servers:  # warm every path once, unmeasured
                        for (rpc_name, proto_name), body in bodies_of.get(server.name, first).items():
                            proto = next(x for x in PROTOCOLS if x.name == proto_name)
                            subprocess.run(
                                h2load_argv(server.url, rpc_name, proto, body, shapes[0], 0.3, warm_up=0),
                                capture_output=True,
                                check=True,
                            )
                    for rnd in range(args.rounds):
                        for rpc_name, proto_name in first:
                            proto = next(x for x in PROTOCOLS if x.name == proto_name)
                            for shape in shapes:
                                meta = {"stored": stored, "rpc": rpc_name, "protocol": proto_name}
                                meta |= {"shape": shape.name, "round": rnd}
                                for server in rotated(servers, rnd + len(runs)):
                                    body = bodies_of.get(server.name, first)[(rpc_name, proto_name)]
                                    r = measure(server, rpc_name, proto, body, shape, args.duration, meta)
                                    runs.append(r)
                                    print(
                                        f"  {stored:>6} {rpc_name:<9} {proto_name:<13} {shape.name:<8}"
                                        f" {server.name:<12} {r.req_per_s:7.0f} req/s  p50 {r.p50_ms:6.2f} ms"
                                        f"  CPU {r.cpu_ms_per_req:6.3f} ms/req (children {r.child_cpu_ms_per_req:.3f})"
                                        f"  failed {r.failed}  load {r.loadavg_1m:.1f}",
                                        flush=True,
                                    )
                    if args.profile and stored == sizes[-1]:
                        profiles = profile_all(root, servers, bodies_of, shapes[0], args.profile_seconds)
    summary = summarise(runs, sides)
    attach_costs(profiles, summary)
    report(summary, profiles)
    write_results(
        NAME,
        argv,
        args,
        context,
        {
            "runs": [asdict(r) for r in runs],
            "response_bytes": sizes_bytes,
            "summary": summary,
            "profiles": profiles,
            "targets": targets(summary, max(sizes)),
        },
    )
    return 0


def profile_all(
    root: Path,
    servers: Sequence[Server],
    bodies_of: dict[str, dict[tuple[str, str], Path]],
    shape: Shape,
    seconds: float,
) -> list[dict[str, Any]]:
    """py-spy on every server under the `load` shape, per rpc and protocol: layer shares and the
    hottest functions."""
    out = []
    first = next(iter(bodies_of.values()))
    for rpc, proto_name in first:
        proto = next(x for x in PROTOCOLS if x.name == proto_name)
        for server in (s for s in servers if not s.name.endswith("-pyvoy")):  # py-spy: hypercorn sides
            body = bodies_of.get(server.name, first)[(rpc, proto_name)]
            raw = root / f"profile-{server.name}-{rpc}-{proto_name}.txt"
            text = record_profile(server.url, server.pid, raw, rpc, proto, body, shape, seconds)
            top = summarise_profile(text, seconds, PROFILE_RATE, 25)
            out.append({"side": server.name, "rpc": rpc, "protocol": proto_name, **layer_shares(text), **top})
            print(f"  profiled {server.name} {rpc} {proto_name}: {out[-1]['pct']}", flush=True)
    return out


def attach_costs(profiles: list[dict[str, Any]], summary: Sequence[dict[str, Any]]) -> None:
    """ms of CPU per request of each layer: its share of samples x the side's CPU per request
    (own process only: reaped children, the `ip` processes, are not sampled and listed apart)."""
    largest = max((s["stored"] for s in summary), default=0)
    for prof in profiles:
        row = next(
            (
                s
                for s in summary
                if (s["stored"], s["rpc"], s["protocol"], s["shape"])
                == (largest, prof["rpc"], prof["protocol"], "load")
            ),
            None,
        )
        if row is None or f"{prof['side']}_cpu_ms_per_req" not in row:
            continue
        own = row[f"{prof['side']}_cpu_ms_per_req"] - row[f"{prof['side']}_child_cpu_ms_per_req"]
        prof["ms_per_req"] = {layer: round(own * pct / 100, 4) for layer, pct in prof["pct"].items()}
        prof["children_ms_per_req"] = row[f"{prof['side']}_child_cpu_ms_per_req"]


def summarise(runs: Sequence[Run], sides: Sequence[str]) -> list[dict[str, Any]]:
    """Per (stored, rpc, protocol, shape): each side's medians over rounds, and the median over
    rounds of floor CPU / daemon CPU (how close to the floor the daemon is: 1 = at the floor)."""
    keys = sorted(
        {(r.stored, r.rpc, r.protocol, r.shape) for r in runs}, key=lambda k: (k[1], k[0], k[3], k[2])
    )
    out = []
    for key in keys:
        case = [r for r in runs if (r.stored, r.rpc, r.protocol, r.shape) == key]
        row: dict[str, Any] = dict(zip(("stored", "rpc", "protocol", "shape"), key, strict=True))
        for side in sides:
            mine = [r for r in case if r.side == side]
            if not mine:
                continue
            for field in (
                "req_per_s",
                "p50_ms",
                "p99_ms",
                "cpu_ms_per_req",
                "child_cpu_ms_per_req",
                "loadavg_1m",
            ):
                row[f"{side}_{field}"] = round(median([getattr(r, field) for r in mine]), 4)
        for side, daemon in PAIRS:
            pairs = [
                (d.cpu_ms_per_req, f.cpu_ms_per_req)
                for d in case
                if d.side == daemon
                for f in case
                if f.side == side and f.round == d.round and d.cpu_ms_per_req
            ]
            if pairs:
                row[f"{side}_over_{daemon}_cpu"] = round(median([f / d for d, f in pairs]), 3)
        out.append(row)
    return out


def targets(summary: Sequence[dict[str, Any]], largest: int) -> dict[str, Any]:
    at = [s for s in summary if s["stored"] == largest]
    get = [s for s in at if s["rpc"] == "GetVmInfo" and s["shape"] == "load"]
    lists = [s for s in at if s["rpc"] == "ListVms" and s["shape"] == "1 client"]
    return {
        "stored": largest,
        "get_vm_info_cpu_ms": {s["protocol"]: s.get("daemon_cpu_ms_per_req") for s in get},
        "get_vm_info_target_cpu_ms": GET_TARGET_CPU_MS,
        "get_vm_info_met": all(s.get("daemon_cpu_ms_per_req", 1e9) <= GET_TARGET_CPU_MS for s in get),
        "get_vm_info_floor_ratio": {s["protocol"]: s.get("floor_over_daemon_cpu") for s in get},
        "list_vms_p50_ms_1_client": {s["protocol"]: s.get("daemon_p50_ms") for s in lists},
        "list_vms_cpu_ms": {s["protocol"]: s.get("daemon_cpu_ms_per_req") for s in lists},
        "list_vms_target_p50_ms": LIST_TARGET_P50_MS,
        "list_vms_met": all(s.get("daemon_p50_ms", 1e9) <= LIST_TARGET_P50_MS for s in lists),
        "list_vms_floor_ratio": {s["protocol"]: s.get("floor_over_daemon_cpu") for s in lists},
        "floor_ratio_aim": FLOOR_RATIO_AIM,
        "pyvoy": {
            "get_vm_info_cpu_ms": {s["protocol"]: s.get("daemon-pyvoy_cpu_ms_per_req") for s in get},
            "get_vm_info_floor_ratio": {
                s["protocol"]: s.get("floor-pyvoy_over_daemon-pyvoy_cpu") for s in get
            },
            "list_vms_p50_ms_1_client": {s["protocol"]: s.get("daemon-pyvoy_p50_ms") for s in lists},
            "list_vms_floor_ratio": {
                s["protocol"]: s.get("floor-pyvoy_over_daemon-pyvoy_cpu") for s in lists
            },
        },
    }


def report(summary: Sequence[dict[str, Any]], profiles: Sequence[dict[str, Any]]) -> None:
    for daemon, floor in (("daemon", "floor"), ("daemon-pyvoy", "floor-pyvoy")):
        if not any(f"{daemon}_cpu_ms_per_req" in s for s in summary):
            continue
        headers = ["stored", "rpc", "protocol", "shape", f"{daemon} req/s", "p50 ms", "p99 ms", "CPU ms/req"]
        headers += [f"{floor} req/s", "floor p50", "floor CPU ms", "floor/daemon CPU", "load"]
        print_table(
            f"{daemon} beside {floor} (medians over rounds; CPU = server process + reaped children)",
            headers,
            [
                (
                    s["stored"],
                    s["rpc"],
                    s["protocol"],
                    s["shape"],
                    *(
                        s.get(f"{daemon}_{k}", "")
                        for k in ("req_per_s", "p50_ms", "p99_ms", "cpu_ms_per_req")
                    ),
                    *(s.get(f"{floor}_{k}", "") for k in ("req_per_s", "p50_ms", "cpu_ms_per_req")),
                    s.get(f"{floor}_over_{daemon}_cpu", ""),
                    s.get(f"{daemon}_loadavg_1m", ""),
                )
                for s in summary
            ],
        )
    for prof in profiles:
        costs = prof.get("ms_per_req", {})
        print_table(
            f"py-spy: {prof['side']} {prof['rpc']} {prof['protocol']} ({prof['samples']} samples;"
            f" children {prof.get('children_ms_per_req', 0)} ms/req not sampled)",
            ["layer", "% samples", "ms/req"],
            [(layer, pct, costs.get(layer, "")) for layer, pct in prof["pct"].items()],
        )


if __name__ == "__main__":
    sys.exit(main())
