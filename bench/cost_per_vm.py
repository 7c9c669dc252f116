"""Cost per VM: the daemon's RSS and open fds with 0, 10, 50 VMs running, and each VM's VMM memory.

VMs (128 MiB, 1 vCPU, the default guest) are booted through the API in waves (--wave at once, each
wave waited for its ready lines), then the daemon is left alone for --settle seconds before it is
measured: this is about steady state, not boot. Per VM: the QEMU process and its supervisor (a small
Python process, QEMU's parent), RSS and PSS (shared pages split among the processes sharing them).

    .venv/bin/python -m bench.cost_per_vm
    .venv/bin/python -m bench.cost_per_vm --levels 0,10,50,100 --wave 10
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from bench.common import (
    bench_daemon,
    bench_rpc,
    boot_through_api,
    create_vms,
    daemon_pid,
    delete_vms,
    fd_count,
    machine_context,
    median,
    parent_pid,
    parser,
    print_table,
    proc_status,
    pss_kib,
    qemu_pids,
    vm_config,
    workdir,
    write_results,
)
from tests.support.daemon import Daemon

NAME = "cost_per_vm"
TARGET_KIB_PER_VM = 200


@dataclass(frozen=True)
class Level:
    vms: int
    daemon_rss_kib: int
    daemon_anon_kib: int
    daemon_pss_kib: int
    daemon_fds: int
    daemon_threads: int
    qemu_rss_kib: float  # medians over the level's VMs (0 without VMs)
    qemu_pss_kib: float
    supervisor_rss_kib: float
    supervisor_pss_kib: float


def measure(daemon: Daemon, running: Sequence[str]) -> Level:
    pid = daemon_pid(daemon)
    status = proc_status(pid)
    qemus = list(qemu_pids(running).values())
    if len(qemus) != len(running):
        raise RuntimeError(f"expected {len(running)} QEMU processes, found {len(qemus)}")
    supervisors = [parent_pid(q) for q in qemus]  # QEMU's parent: the per-VM supervisor

    def med(values: list[int]) -> float:
        return median(values) if values else 0.0

    return Level(
        vms=len(running),
        daemon_rss_kib=status["VmRSS"],
        daemon_anon_kib=status["RssAnon"],
        daemon_pss_kib=pss_kib(pid),
        daemon_fds=fd_count(pid),
        daemon_threads=status["Threads"],
        qemu_rss_kib=med([proc_status(p).get("VmRSS", 0) for p in qemus]),
        qemu_pss_kib=med([pss_kib(p) for p in qemus]),
        supervisor_rss_kib=med([proc_status(p).get("VmRSS", 0) for p in supervisors]),
        supervisor_pss_kib=med([pss_kib(p) for p in supervisors]),
    )


def per_vm(levels: Sequence[Level]) -> list[dict[str, float]]:
    """Daemon growth per additional VM, from no VM and from the previous level."""
    out = []
    base = levels[0]
    for prev, cur in itertools.pairwise(levels):
        added = cur.vms - prev.vms
        out.append(
            {
                "from": prev.vms,
                "to": cur.vms,
                "rss_kib_per_vm": (cur.daemon_rss_kib - prev.daemon_rss_kib) / added,
                "anon_kib_per_vm": (cur.daemon_anon_kib - prev.daemon_anon_kib) / added,
                "fds_per_vm": (cur.daemon_fds - prev.daemon_fds) / added,
                "rss_kib_per_vm_from_first": (cur.daemon_rss_kib - base.daemon_rss_kib)
                / (cur.vms - base.vms),
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser(NAME, "Daemon RSS and fds with N VMs running; per-VM QEMU and supervisor memory.")
    p.add_argument("--levels", default="0,10,50", help="running VMs to measure at, ascending")
    p.add_argument("--wave", type=int, default=10, help="VMs booted at once")
    p.add_argument("--memory-mib", type=int, default=128)
    p.add_argument("--settle", type=float, default=10.0, help="seconds of quiet before measuring")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one wave")
    args = p.parse_args(argv)
    wanted = [int(n) for n in args.levels.split(",")]
    context = machine_context()
    levels: list[Level] = []
    # Enough host vCPU quota for every level (the default allows 8 per core).
    quota = ["--vcpu-overcommit-ratio", str(max(8, max(wanted)))]
    with workdir(args.workdir) as root, bench_daemon(root, args.assets_dir, *quota) as daemon:
        rpc = bench_rpc(daemon)
        running: list[str] = []
        try:
            for target in wanted:
                while len(running) < target:
                    wave = create_vms(rpc, min(args.wave, target - len(running)), vm_config(args.memory_mib))
                    boot = boot_through_api(rpc, daemon, wave, args.timeout)
                    running += wave
                    print(f"{len(running)} VMs running (wave of {len(wave)} ready in {boot.wall:.1f} s)")
                time.sleep(args.settle)
                levels.append(measure(daemon, running))
                print(f"measured at {target} VMs: daemon RSS {levels[-1].daemon_rss_kib / 1024:.1f} MiB")
        finally:
            delete_vms(rpc, running)
    growth = per_vm(levels)
    overall = (levels[-1].daemon_rss_kib - levels[0].daemon_rss_kib) / max(1, levels[-1].vms - levels[0].vms)
    report(levels, growth, overall, args)
    write_results(
        NAME,
        argv,
        args,
        context,
        {
            "levels": [asdict(level) for level in levels],
            "per_vm": growth,
            "daemon_rss_kib_per_vm": overall,
            "target_kib_per_vm": TARGET_KIB_PER_VM,
            "target_met": overall <= TARGET_KIB_PER_VM,
        },
    )
    return 0


def report(
    levels: Sequence[Level], growth: Sequence[dict[str, float]], overall: float, args: argparse.Namespace
) -> None:
    print_table(
        f"Steady state with N VMs running ({args.memory_mib} MiB guests; KiB unless noted; VMM columns: median per VM)",
        [
            "N",
            "daemon RSS",
            "anon",
            "PSS",
            "fds",
            "threads",
            "QEMU RSS",
            "QEMU PSS",
            "superv. RSS",
            "superv. PSS",
        ],
        [
            (
                lv.vms,
                lv.daemon_rss_kib,
                lv.daemon_anon_kib,
                lv.daemon_pss_kib,
                lv.daemon_fds,
                lv.daemon_threads,
                lv.qemu_rss_kib,
                lv.qemu_pss_kib,
                lv.supervisor_rss_kib,
                lv.supervisor_pss_kib,
            )
            for lv in levels
        ],
    )
    print_table(
        "Daemon growth per additional VM",
        ["from", "to", "RSS KiB/VM", "anon KiB/VM", "fds/VM", "RSS KiB/VM since first level"],
        [list(g.values()) for g in growth],
    )
    verdict = "met" if overall <= TARGET_KIB_PER_VM else "missed"
    print(
        f"\ndaemon RSS per VM, {levels[0].vms} -> {levels[-1].vms}: {overall:.0f} KiB (target <= {TARGET_KIB_PER_VM}: {verdict})"
    )


if __name__ == "__main__":
    sys.exit(main())
