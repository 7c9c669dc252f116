"""Boot overhead: BootVm call -> METALD_READY on the console, against the same QEMU argv started by hand.

Three sides boot the same kernel, initrd and root image (a fresh qcow2 overlay each time, made before
the clock starts, as CreateVm does), one VM at a time, interleaved (the order rotates every round):
`api` is the daemon as shipped (each VMM in its own cgroup: CPU quota = vCPUs x 1 core, memory cap);
`api-no-cgroup` is the same daemon given no cgroup hierarchy, to tell the daemon's own work apart from
the cgroup's CPU quota; `hand` is the same QEMU argv started by the benchmark. The ready line is found the same way on both sides: the benchmark polls the console
log every 5 ms with the daemon's own ReadyWatch.

    .venv/bin/python -m bench.boot_overhead --runs 10
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    API,
    HAND,
    SIDES,
    Boot,
    HandVm,
    bench_rpc,
    boot_by_hand,
    boot_daemons,
    boot_through_api,
    host_options,
    launch_spec,
    machine_context,
    median,
    parser,
    print_table,
    side_order,
    vm_config,
    workdir,
    write_results,
)
from metald.backends import procfs
from metald.backends.qemu.cmdline import DiskFds, VmmFds, qemu_argv
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

NAME = "boot_overhead"
TARGET_RATIO = 1.05
_FD = re.compile(r"(fd=|set=|/dev/fdset/|/proc/self/fd/)\d+")  # descriptor numbers differ per process
_ANY_FDS = VmmFds(
    kernel=3, initrd=4, disks=(DiskFds((5, 6), 7),), console=8, serial=None, qmp=9, agent=10, ram=11
)


def check_same_argv(rpc: Rpc, daemon: Daemon, vm_id: str, assets: Path, memory_mib: int) -> None:
    """The running QEMU of `vm_id` must have exactly the argv the benchmark runs by hand."""
    pid = int(rpc.info(vm_id)["backend_info"]["process_id"])
    actual = [_FD.sub(r"\1N", a) for a in procfs.read_cmdline(pid)]
    spec = launch_spec(assets, daemon.data_dir / "vms" / vm_id, vm_id, memory_mib)
    expected = [_FD.sub(r"\1N", a) for a in qemu_argv(spec, host_options(), _ANY_FDS)]
    if actual != expected:
        diff = [
            f"  daemon: {a!r}\n  hand:   {e!r}" for a, e in itertools.zip_longest(actual, expected) if a != e
        ]
        raise SystemExit("the daemon's QEMU argv differs from the hand-built one:\n" + "\n".join(diff))


def run_api(rpc: Rpc, daemon: Daemon, args: argparse.Namespace, check: bool) -> Boot:
    """One API boot."""
    vm_id = rpc.create(vm_config(args.memory_mib))
    try:
        boot = boot_through_api(rpc, daemon, [vm_id], args.timeout)
        if check:
            check_same_argv(rpc, daemon, vm_id, args.assets_dir, args.memory_mib)
    finally:
        rpc.ok("DeleteVm", {"vm_id": vm_id, "force": True})
    return boot


def run_hand(root: Path, args: argparse.Namespace) -> Boot:
    vm = HandVm.prepare(root / HAND, args.assets_dir, args.memory_mib)
    try:
        return boot_by_hand([vm], args.timeout)
    finally:
        vm.destroy()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser(NAME, "BootVm -> ready line vs the same QEMU argv by hand (interleaved, medians).")
    p.add_argument("--runs", type=int, default=10, help="measured runs per side")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs per side first")
    p.add_argument("--memory-mib", type=int, default=256, help="guest memory (the daemon's default)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one ready line")
    args = p.parse_args(argv)
    context = machine_context()
    boots: dict[str, list[Boot]] = {side: [] for side in SIDES}
    with workdir(args.workdir) as root, boot_daemons(root, args.assets_dir) as daemons:
        rpcs = {side: bench_rpc(d) for side, d in daemons.items()}
        for i in range(args.warmup + args.runs):
            measured = i >= args.warmup
            for side in side_order(i):
                if side == HAND:
                    boot = run_hand(root, args)
                else:
                    boot = run_api(rpcs[side], daemons[side], args, check=i == 0)
                if measured:
                    boots[side].append(boot)
                label = f"run {i + 1 - args.warmup:>3}{'' if measured else ' (warm-up)'}"
                print(
                    f"{label} {side:>13}: {boot.wall:.3f} s (QEMU born at {boot.spawned[0]:.3f} s)",
                    flush=True,
                )
    hand = [b.wall for b in boots[HAND]]
    summary: dict[str, dict[str, Any]] = {}
    for side, runs in boots.items():
        walls = [b.wall for b in runs]
        summary[side] = {
            "ready_s": walls,
            "median_s": median(walls),
            "ratio_to_hand": median(walls) / median(hand),
            # each round's sides ran back to back and share its noise
            "median_paired_ratio": median([v / h for v, h in zip(walls, hand, strict=True)]),
            # where the time goes: until QEMU exists, then QEMU's own boot to the ready line
            "median_to_qemu_birth_s": median([b.spawned[0] for b in runs]),
            "median_qemu_birth_to_ready_s": median([b.wall - b.spawned[0] for b in runs]),
        }
        if side != HAND:
            summary[side]["median_rpc_return_s"] = median([b.returned[0] for b in runs])
    print_table(
        f"Boot to ready line, {args.runs} interleaved rounds (seconds; ratios to by hand)",
        [
            "side",
            "median",
            "min",
            "max",
            "ratio",
            "per-round ratio",
            "to QEMU birth",
            "QEMU to ready",
            "BootVm returns",
        ],
        [
            (
                side,
                s["median_s"],
                min(s["ready_s"]),
                max(s["ready_s"]),
                s["ratio_to_hand"],
                s["median_paired_ratio"],
                s["median_to_qemu_birth_s"],
                s["median_qemu_birth_to_ready_s"],
                s.get("median_rpc_return_s", ""),
            )
            for side, s in summary.items()
        ],
    )
    ratio = summary[API]["ratio_to_hand"]
    verdict = "met" if ratio <= TARGET_RATIO else "missed"
    print(f"\nAPI (as shipped) / hand: {ratio:.3f}  (target <= {TARGET_RATIO}: {verdict})")
    write_results(
        NAME,
        argv,
        args,
        context,
        {"sides": summary, "ratio": ratio, "target_ratio": TARGET_RATIO, "target_met": ratio <= TARGET_RATIO},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
