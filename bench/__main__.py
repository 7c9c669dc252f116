"""`python -m bench`: every benchmark, one after the other, then the plots (bench/results/*.png).

Default sizes take ~15 minutes on an idle host; `--quick` runs each in its smallest useful form
(~5 minutes idle): fewer boots, N up to 4, 10,000 stored VMs only, short load runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from bench import (
    api_floor,
    api_load,
    boot_overhead,
    cost_per_vm,
    fleet_gateway,
    guest_exec,
    parallel_boots,
    plots,
    snapshot_boot,
    watch_fanout,
)

# (benchmark, its arguments in the quick form)
BENCHMARKS: tuple[tuple[Callable[[list[str]], int], str, list[str]], ...] = (
    (boot_overhead.main, "boot_overhead", ["--runs", "3", "--warmup", "0"]),
    (parallel_boots.main, "parallel_boots", ["--ns", "1,4"]),
    (api_floor.main, "api_floor", ["--quick"]),
    (api_load.main, "api_load", ["--sizes", "10,1000", "--duration", "1", "--no-profile"]),
    (cost_per_vm.main, "cost_per_vm", ["--levels", "0,10", "--settle", "3"]),
    (guest_exec.main, "guest_exec", []),
    (watch_fanout.main, "watch_fanout", ["--watchers", "1,100", "--cycles", "100"]),
    (snapshot_boot.main, "snapshot_boot", ["--runs", "3", "--counts", "1,4", "--snapshots", "3"]),
    (fleet_gateway.main, "fleet_gateway", ["--rounds", "100", "--creates", "30"]),
)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="the smallest useful form of each benchmark")
    p.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    only = {n for n in args.only.split(",") if n}
    for run, name, quick in BENCHMARKS:
        if only and name not in only:
            continue
        print(f"\n===== {name} =====", flush=True)
        run(quick if args.quick else [])
    plots.plot_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
