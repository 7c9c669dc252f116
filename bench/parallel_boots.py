"""Parallel boots: N VMs booted at once through the API vs the same N QEMUs started by hand.

For each N: N VMs are created (API) or prepared (by hand: directory + qcow2 overlay) before the clock
starts; then all N are booted at once and the clock stops at the last ready line. The sides are those
of boot_overhead (`api` as shipped, `api-no-cgroup`, `hand`), their order rotating every round.
Ratio = side's wall time / by-hand wall time.

    .venv/bin/python -m bench.parallel_boots                 # N = 1,4,8,16, one round each
    .venv/bin/python -m bench.parallel_boots --ns 1,4,8,16,32 --repeat 3
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    API,
    API_NO_CGROUP,
    HAND,
    SIDES,
    Boot,
    bench_rpc,
    boot_by_hand,
    boot_daemons,
    boot_through_api,
    create_vms,
    delete_vms,
    hand_vms,
    machine_context,
    median,
    parser,
    print_table,
    side_order,
    vm_config,
    workdir,
    write_results,
)
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

NAME = "parallel_boots"


def api_round(rpc: Rpc, daemon: Daemon, n: int, args: argparse.Namespace) -> Boot:
    vm_ids = create_vms(rpc, n, vm_config(args.memory_mib))
    try:
        return boot_through_api(rpc, daemon, vm_ids, args.timeout)
    finally:
        delete_vms(rpc, vm_ids)


def hand_round(root: Path, n: int, args: argparse.Namespace) -> Boot:
    with hand_vms(root / "hand", args.assets_dir, n, args.memory_mib) as vms:
        return boot_by_hand(vms, args.timeout)


def summarise(n: int, boots: dict[str, list[Boot]]) -> dict[str, Any]:
    """Medians over the rounds of one N: wall time to the last ready line, per-VM ready time, ratios."""
    hand_wall = median([b.wall for b in boots[HAND]])
    out: dict[str, Any] = {"n": n, "rounds": len(boots[HAND])}
    for side, rounds in boots.items():
        wall = median([b.wall for b in rounds])
        out[side] = {
            "wall_s": wall,
            "ratio_wall_to_hand": wall / hand_wall,
            "vm_ready_median_s": median([t for b in rounds for t in b.ready]),
            "last_qemu_birth_s": median([b.spawned[-1] for b in rounds]),
            "walls_s": [b.wall for b in rounds],
        }
        if side != HAND:
            out[side]["rpc_return_wall_s"] = median([b.returned[-1] for b in rounds])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser(NAME, "N VMs booted at once through the API vs by hand: ratio of total wall time.")
    p.add_argument("--ns", default="1,4,8,16", help="comma-separated N values")
    p.add_argument("--repeat", type=int, default=1, help="rounds per side and N")
    p.add_argument("--memory-mib", type=int, default=256, help="guest memory (the daemon's default)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the last ready line")
    args = p.parse_args(argv)
    ns = [int(n) for n in args.ns.split(",")]
    context = machine_context()
    summaries: list[dict[str, Any]] = []
    # N at once needs N vCPUs of host quota: the default (8 per core) stops at 16 on 2 cores.
    quota = ["--vcpu-overcommit-ratio", str(max(8, max(ns)))]
    with workdir(args.workdir) as root, boot_daemons(root, args.assets_dir, *quota) as daemons:
        rpcs = {side: bench_rpc(d) for side, d in daemons.items()}
        round_no = 0
        for n in ns:
            boots: dict[str, list[Boot]] = {side: [] for side in SIDES}
            for _ in range(args.repeat):
                for side in side_order(round_no):
                    if side == HAND:
                        boot = hand_round(root, n, args)
                    else:
                        boot = api_round(rpcs[side], daemons[side], n, args)
                    boots[side].append(boot)
                    print(
                        f"N={n:<3} {side:>13}: last ready {boot.wall:.2f} s, median {median(boot.ready):.2f} s",
                        flush=True,
                    )
                round_no += 1
            summaries.append(summarise(n, boots))
    print_table(
        f"N VMs booted at once, {args.repeat} round(s) per side (seconds to the last ready line; ratio = side / hand)",
        ["N", "hand", API, "ratio", API_NO_CGROUP, "ratio ", "hand median VM", "api median VM"],
        [
            (
                s["n"],
                s[HAND]["wall_s"],
                s[API]["wall_s"],
                s[API]["ratio_wall_to_hand"],
                s[API_NO_CGROUP]["wall_s"],
                s[API_NO_CGROUP]["ratio_wall_to_hand"],
                s[HAND]["vm_ready_median_s"],
                s[API]["vm_ready_median_s"],
            )
            for s in summaries
        ],
    )
    write_results(NAME, argv, args, context, summaries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
