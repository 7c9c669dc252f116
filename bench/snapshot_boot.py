"""Start from a snapshot: a clone's BootVm(wait_for_ready) against a cold boot and against the same
restore done by hand, interleaved; N clones at once; Pss per clone; the pause SnapshotVm imposes.

Sides of one round (the order rotates every round):
- `cold`: CreateVm + BootVm(wait_for_ready) of the default guest (ready line on the console);
- `clone`: CreateVm(snapshot_id) + BootVm(wait_for_ready) (ready = the restored guest's agent answers);
- `hand`: the same QEMU argv the daemon runs for a clone, started by the benchmark on a clone
  overlay made before the clock starts, restored over QMP (x-ignore-shared + migrate-incoming fd: +
  cont), ready when its agent answers: the floor.
- `pool`: `clone` of a snapshot with warm_pool_size 1, its slot waiting (BootVm takes it);
- `pool_hand`: `hand` with QEMU already started and its QMP connected before the clock starts
  (waiting in `-incoming defer`): the clock covers migrate-incoming + cont + the agent's answer,
  the raw pool floor.
Creates are outside the clock on every side (the overlay is made at CreateVm), and every side waits
until the warm pool is full again before its clock starts (a refill is background work).

`--nics` measures instead, on a daemon with networking (its own host namespace), a clone with one
NIC: `clone_nic` (no pool) against `pool_nic` (a slot waiting with its TAP held), interleaved.
BootVm includes the network's attach and the clone's identity (MAC, addresses) over the agent.

    .venv/bin/python -m bench.snapshot_boot --runs 8 --counts 1,4,8,16
    .venv/bin/python -m bench.snapshot_boot --nics --runs 8
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import (
    CUSTOMER,
    HAND_RAM,
    RESULTS_DIR,
    bench_daemon,
    bench_rpc,
    boot_vm,
    delete_vms,
    host_options,
    launch_spec,
    machine_context,
    median,
    parser,
    percentile,
    print_table,
    pss_kib,
    qemu_pids,
    vm_config,
    workdir,
    write_results,
)
from metald.backends.qemu import layout, snapshot
from metald.backends.qemu.agent import GuestAgent
from metald.backends.qemu.cmdline import qemu_argv
from metald.backends.qemu.files import close_fds, open_vmm_files
from metald.backends.qemu.overlay import prepare_vm_dir
from metald.backends.qemu.qmp import QmpClient
from metald.domain import ids
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

NAME = "snapshot_boot"
POOLED = "snap-pool"  # the snapshot with a warm pool of one slot
SIDES = ("cold", "clone", "hand", "pool", "pool_hand")
QEMU_IMG = "qemu-img"
TARGETS = {
    "clone_over_hand": 1.3,
    "pool_over_pool_hand": 1.5,
    "clone_over_cold": 0.05,
    "n16_over_hand": 1.2,
    "pss_mib": 64,
    "pause_ms": 50,
}
_PAUSE = re.compile(r"^\w*_snapshot_pause_seconds_(sum|count)\{[^}]*\} ([0-9.e+-]+)$", re.M)
_POOL = re.compile(
    r'^unkey_metald_warm_pool_(slots\{state="ready"\}|hits_total|misses_total) ([0-9.e+-]+)$', re.M
)
POOL_FILL_TIMEOUT = 120.0
NIC = {"network": [{"interface_id": "eth0"}]}
NIC_SIDES = ("clone_nic", "pool_nic")


# ---- the API sides ---------------------------------------------------------------------------------


def timed_boots(rpc: Rpc, vm_ids: Sequence[str], timeout: float) -> list[float]:
    """BootVm(wait_for_ready) of every VM at once; seconds from the first call to each return."""
    with ThreadPoolExecutor(max_workers=len(vm_ids)) as pool:
        started = time.monotonic()
        returned = list(pool.map(lambda vm_id: boot_vm(rpc, vm_id, timeout), vm_ids))
    return sorted(t - started for t in returned)


def api_boots(rpc: Rpc, count: int, body: dict[str, Any], timeout: float) -> list[float]:
    vm_ids = [rpc.create(**body) for _ in range(count)]
    try:
        return timed_boots(rpc, vm_ids, timeout)
    finally:
        delete_vms(rpc, vm_ids)


def pause_seconds(daemon: Daemon) -> tuple[float, int]:
    """(sum, count) of the daemon's snapshot pause histogram."""
    text = Rpc(daemon.url, CUSTOMER).client.get("/metrics").text
    found = {kind: float(value) for kind, value in _PAUSE.findall(text)}
    return found.get("sum", 0.0), int(found.get("count", 0))


def pool_figures(daemon: Daemon) -> dict[str, float]:
    """The warm pool's metrics: ready slots, hits, misses."""
    text = Rpc(daemon.url, CUSTOMER).client.get("/metrics").text
    return {name.split("{")[0]: float(value) for name, value in _POOL.findall(text)}


def wait_pool_full(daemon: Daemon, ready: int) -> None:
    deadline = time.monotonic() + POOL_FILL_TIMEOUT
    while pool_figures(daemon).get("slots", 0) < ready:
        if time.monotonic() > deadline:
            raise SystemExit(f"the warm pool did not refill to {ready} within {POOL_FILL_TIMEOUT:g}s")
        time.sleep(0.05)


# ---- by hand ------------------------------------------------------------------------------------------


async def _restore_by_hand(
    root: Path, assets: Path, snapshot_dir: Path, memory_mib: int, timeout: float, *, waiting: bool = False
) -> float:
    """Seconds to a restored guest's agent answer, from QEMU's spawn; `waiting`: from the moment
    a QEMU already started and connected asks for its device state (the raw pool floor)."""
    vm_id = ids.new_vm_id()
    spec = dataclasses.replace(
        launch_spec(assets, root / vm_id, vm_id, memory_mib), restore_from=snapshot_dir
    )
    await prepare_vm_dir(spec, qemu_img=QEMU_IMG)  # the clone overlay: CreateVm's work
    started = time.monotonic()
    fds = await asyncio.to_thread(open_vmm_files, spec, HAND_RAM)
    try:
        log = await asyncio.to_thread(open, spec.vm_dir / "vmm.log", "ab")
        proc = await asyncio.create_subprocess_exec(
            *qemu_argv(spec, host_options(), fds),
            cwd=spec.vm_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=fds.all(),
        )
        log.close()
    finally:
        close_fds(fds)
    try:
        qmp = await QmpClient.connect(spec.vm_dir, layout.QMP_SOCKET, timeout=timeout)
        if waiting:
            await qmp.execute("query-status")  # up and waiting, as a pool slot is
            await asyncio.sleep(0.5)
            started = time.monotonic()
        assert fds.incoming is not None
        await snapshot.restore(qmp, fds.incoming)
        agent = await GuestAgent.connect(spec.vm_dir, timeout=timeout)
        try:
            if not await agent.ping(timeout):
                raise SystemExit(f"restored guest {vm_id} never answered")
        finally:
            await agent.close()
        ready = time.monotonic() - started
        await qmp.close()
        return ready
    finally:
        proc.kill()
        await proc.wait()
        shutil.rmtree(spec.vm_dir, ignore_errors=True)


def hand_boots(
    root: Path, args: argparse.Namespace, snapshot_dir: Path, count: int, *, waiting: bool = False
) -> list[float]:
    async def all_at_once() -> list[float]:
        runs = [
            _restore_by_hand(
                root, args.assets_dir, snapshot_dir, args.memory_mib, args.timeout, waiting=waiting
            )
            for _ in range(count)
        ]
        return sorted(await asyncio.gather(*runs))

    return asyncio.run(all_at_once())


# ---- the run --------------------------------------------------------------------------------------------


def one_side(
    side: str, rpc: Rpc, root: Path, args: argparse.Namespace, snap: tuple[str, Path], n: int
) -> list[float]:
    if side == "cold":
        return api_boots(rpc, n, {"config": vm_config(args.memory_mib)}, args.timeout)
    if side == "clone":
        return api_boots(rpc, n, {"config": {}, "snapshot_id": snap[0]}, args.timeout)
    if side == "pool":
        return api_boots(rpc, n, {"config": {}, "snapshot_id": POOLED}, args.timeout)
    return hand_boots(root / "hand", args, snap[1], n, waiting=side == "pool_hand")


def clone_pss(rpc: Rpc, snapshot_id: str, count: int, timeout: float) -> list[float]:
    """MiB of Pss of each of `count` ready clones running at once."""
    vm_ids = [rpc.create({}, snapshot_id=snapshot_id) for _ in range(count)]
    try:
        timed_boots(rpc, vm_ids, timeout)
        time.sleep(1.0)
        return [pss_kib(pid) / 1024 for pid in qemu_pids(vm_ids).values()]
    finally:
        delete_vms(rpc, vm_ids)


def interleaved(
    daemon: Daemon, sides: Sequence[str], runs: int, one: Callable[[str], float]
) -> dict[str, Any]:
    """`runs` rounds of one boot per side (after a warm-up round), the order rotating each round,
    each side's clock started with the warm pool full: medians, p90s and the pool's hits/misses."""
    pool_before = pool_figures(daemon)
    single: dict[str, list[float]] = {side: [] for side in sides}
    for i in range(runs + 1):
        k = i % len(sides)
        for side in [*sides[k:], *sides[:k]]:
            wait_pool_full(daemon, 1)
            seconds = one(side)
            if i > 0:  # round 0 warms caches up
                single[side].append(seconds)
            print(f"round {i} {side:>9}: {seconds:.3f} s", flush=True)
    pool_after = pool_figures(daemon)
    return {
        "median_s": {side: median(v) for side, v in single.items()},
        "p90_s": {side: percentile(v, 90) for side, v in single.items()},
        "runs_s": single,
        "pool_hits": pool_after.get("hits_total", 0) - pool_before.get("hits_total", 0),
        "pool_misses": pool_after.get("misses_total", 0) - pool_before.get("misses_total", 0),
    }


def print_sides(title: str, figures: dict[str, Any]) -> None:
    rows = [
        (s, figures["median_s"][s], figures["p90_s"][s], min(v), max(v)) for s, v in figures["runs_s"].items()
    ]
    print_table(title, ["side", "median", "p90", "min", "max"], rows)


def nic_main(argv: Sequence[str], args: argparse.Namespace) -> int:
    """A clone with a NIC: BootVm(wait_for_ready) without and with a warm pool, interleaved."""
    if args.out == RESULTS_DIR / f"{NAME}.json":
        args.out = RESULTS_DIR / f"{NAME}_nic.json"
    context = machine_context()
    with workdir(args.workdir) as root, bench_daemon(root, args.assets_dir, network=True) as daemon:
        rpc = bench_rpc(daemon)
        template = rpc.create({**vm_config(args.memory_mib), **NIC})
        rpc.ok("BootVm", {"vm_id": template, "wait_for_ready": True, "wait_timeout_seconds": args.timeout})
        snapshots = {
            "clone_nic": rpc.ok("SnapshotVm", {"vm_id": template})["snapshot_id"],
            "pool_nic": rpc.ok("SnapshotVm", {"vm_id": template, "warm_pool_size": 1})["snapshot_id"],
        }
        rpc.ok("ShutdownVm", {"vm_id": template, "force": True})
        figures = interleaved(
            daemon,
            NIC_SIDES,
            args.runs,
            lambda side: api_boots(rpc, 1, {"config": NIC, "snapshot_id": snapshots[side]}, args.timeout)[0],
        )
    figures["pool_nic_over_clone_nic"] = figures["median_s"]["pool_nic"] / figures["median_s"]["clone_nic"]
    print_sides(f"A clone with a NIC, start to ready, {args.runs} interleaved rounds (seconds)", figures)
    print(
        f"\npool_nic / clone_nic {figures['pool_nic_over_clone_nic']:.2f} "
        f"({figures['pool_hits']:.0f} hits, {figures['pool_misses']:.0f} misses)"
    )
    write_results(NAME, argv, args, context, figures)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser(NAME, "Clone boots vs cold boots vs restores by hand (interleaved, medians).")
    p.add_argument("--runs", type=int, default=8, help="measured rounds of single boots")
    p.add_argument("--counts", default="1,4,8,16", help="clones started at once, by API and by hand")
    p.add_argument("--snapshots", type=int, default=5, help="SnapshotVm calls to measure the pause")
    p.add_argument("--memory-mib", type=int, default=256)
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--nics", action="store_true", help="instead: a NIC clone without and with a pool")
    args = p.parse_args(argv)
    if args.nics:
        return nic_main(argv, args)
    counts = [int(c) for c in args.counts.split(",") if c]
    context = machine_context()
    with workdir(args.workdir) as root, bench_daemon(root, args.assets_dir) as daemon:
        rpc = bench_rpc(daemon)
        template = rpc.create(vm_config(args.memory_mib))
        rpc.ok("BootVm", {"vm_id": template, "wait_for_ready": True, "wait_timeout_seconds": args.timeout})
        before = pause_seconds(daemon)
        for i in range(args.snapshots):  # the pause of a running guest (extra snapshots deleted)
            extra = rpc.ok("SnapshotVm", {"vm_id": template, "snapshot_id": f"snap-pause-{i}"})
            rpc.ok("DeleteSnapshot", {"snapshot_id": extra["snapshot_id"]})
        after = pause_seconds(daemon)
        pause_ms = 1000 * (after[0] - before[0]) / max(1, after[1] - before[1])
        taken = rpc.ok("SnapshotVm", {"vm_id": template, "snapshot_id": "snap-bench"})
        snap = (str(taken["snapshot_id"]), daemon.data_dir / "snapshots" / str(taken["snapshot_id"]))
        rpc.ok("SnapshotVm", {"vm_id": template, "snapshot_id": POOLED, "warm_pool_size": 1})
        # The template's vCPU would count against the host's limit beside N=16 clones.
        rpc.ok("ShutdownVm", {"vm_id": template, "force": True})
        singles = interleaved(
            daemon, SIDES, args.runs, lambda side: one_side(side, rpc, root, args, snap, 1)[0]
        )
        scaling: dict[int, dict[str, float]] = {}
        for n in counts:
            clone = one_side("clone", rpc, root, args, snap, n)
            hand = one_side("hand", rpc, root, args, snap, n)
            scaling[n] = {
                "clone_all_ready_s": clone[-1],
                "hand_all_ready_s": hand[-1],
                "ratio": clone[-1] / hand[-1],
            }
            print(f"N={n}: clones all ready {clone[-1]:.2f} s, by hand {hand[-1]:.2f} s", flush=True)
        pss = clone_pss(rpc, snap[0], max(counts), args.timeout)
    med = singles["median_s"]
    figures = {
        **singles,
        "clone_over_hand": med["clone"] / med["hand"],
        "clone_over_cold": med["clone"] / med["cold"],
        "pool_over_pool_hand": med["pool"] / med["pool_hand"],
        "pool_over_cold": med["pool"] / med["cold"],
        "scaling": scaling,
        "pss_mib_per_clone": {"median": median(pss), "max": max(pss), "count": len(pss)},
        "snapshot_pause_ms": pause_ms,
        "snapshot_size_bytes": int(taken["size_bytes"]),
        "targets": TARGETS,
    }
    print_sides(f"Start to ready, {args.runs} interleaved rounds (seconds)", figures)
    print(
        f"\nclone / hand {figures['clone_over_hand']:.2f} (target <= 1.3); clone / cold "
        f"{figures['clone_over_cold']:.3f} (target <= 0.05); pool / pool_hand "
        f"{figures['pool_over_pool_hand']:.2f} (target <= 1.5; {figures['pool_hits']:.0f} hits, "
        f"{figures['pool_misses']:.0f} misses); N={max(counts)} clone / hand "
        f"{scaling[max(counts)]['ratio']:.2f} (target <= 1.2); Pss {median(pss):.1f} MiB per clone "
        f"(target <= 64); SnapshotVm pause {pause_ms:.1f} ms (target <= 50)"
    )
    write_results(NAME, argv, args, context, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
