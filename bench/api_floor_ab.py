"""Before/after in one run: the daemon of another checkout (`before`, e.g. a `git archive` of the
base commit) beside this one's (`after`), each with 10,000 VMs stored and one running VM with a
NIC (as bench.api_floor stocks them), measured interleaved in rotating order per rpc, protocol and
shape; prints the medians over rounds and after / before.

    git archive <base> | tar -x -C /tmp/base
    flock /tmp/metald-e2e.lock .venv/bin/python -m bench.api_floor_ab /tmp/base --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import tests.support.daemon as served
from bench.api_floor import Run, Server, capture, measure, rotated, stocked_daemon, write_bodies
from bench.api_load import PROTOCOLS, Shape
from bench.common import DEFAULT_ASSETS, workdir

STORED = 10_000
SHAPES = (Shape("load", 4, 4), Shape("1 client", 1, 1))
RPCS = ("GetVmInfo", "ListVms")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.api_floor_ab", description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path, help="the other checkout (its metald runs the `before` daemon)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=1.5, help="seconds per h2load run")
    p.add_argument("--workdir", type=Path)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    here = served.REPO
    runs: list[Run] = []
    with workdir(args.workdir) as root, contextlib.ExitStack() as stack:
        servers, bodies = [], {}
        for k, (name, repo) in enumerate((("before", args.before.resolve()), ("after", here))):
            served.REPO = repo  # the daemon runs `python -m metald...` in this directory
            try:
                server, running, shutdown = stack.enter_context(
                    stocked_daemon(root / name, DEFAULT_ASSETS, STORED, 20 + k)
                )
            finally:
                served.REPO = here
            servers.append(Server(name, server.url, server.pid))
            bodies[name] = write_bodies((root / name), running)
            capture(server.url, running, shutdown, root / f"responses-{name}")
        for rnd in range(args.rounds):
            for rpc in RPCS:
                for proto in PROTOCOLS:
                    for shape in SHAPES:
                        for server in rotated(servers, rnd + len(runs)):
                            meta = {"stored": STORED, "rpc": rpc, "protocol": proto.name}
                            body = bodies[server.name][(rpc, proto.name)]
                            r = measure(
                                server,
                                rpc,
                                proto,
                                body,
                                shape,
                                args.duration,
                                meta | {"shape": shape.name, "round": rnd},
                            )
                            runs.append(r)
                            print(
                                f"  {rpc:<9} {proto.name:<13} {shape.name:<8} {server.name:<6} {r.req_per_s:7.0f} req/s"
                                f"  p50 {r.p50_ms:6.2f} ms  CPU {r.cpu_ms_per_req:.3f} ms/req  load {r.loadavg_1m:.1f}",
                                flush=True,
                            )
    print("\n| rpc | protocol | shape | CPU ms before | after | after / before | p50 ms before | after |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for rpc in RPCS:
        for proto in PROTOCOLS:
            for shape in SHAPES:
                (b_cpu, b_p50), (a_cpu, a_p50) = (
                    medians(runs, (rpc, proto.name, shape.name, s)) for s in ("before", "after")
                )
                print(
                    f"| {rpc} | {proto.name} | {shape.name} | {b_cpu:.3f} | {a_cpu:.3f} | {a_cpu / b_cpu:.2f} | {b_p50:.2f} | {a_p50:.2f} |"
                )
    loads = [r.loadavg_1m for r in runs]
    print(f"1-min load average {min(loads):.1f}-{max(loads):.1f} during the runs")
    return 0


def medians(runs: Sequence[Run], key: tuple[str, str, str, str]) -> tuple[float, float]:
    """(CPU ms per request, p50 ms): medians over the rounds of (rpc, protocol, shape, side)."""
    chosen = [r for r in runs if (r.rpc, r.protocol, r.shape, r.side) == key]
    return statistics.median(r.cpu_ms_per_req for r in chosen), statistics.median(r.p50_ms for r in chosen)


if __name__ == "__main__":
    raise SystemExit(main())
