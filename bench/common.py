"""What the benchmarks share: a daemon to measure, the same QEMU launched by hand, ready lines, results.

"By hand" means the exact argv the daemon would run (metald.backends.qemu.cmdline.qemu_argv on an
equivalent LaunchSpec, over descriptors opened by the daemon's own open_vmm_files), started directly
by the benchmark as root with the VM directory as working directory: no supervisor, no setpriv, no
cgroup, no API and no store in between. boot_overhead checks once per run that this argv is the one of
the daemon's QEMU (descriptor numbers aside).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx

from metald.backends import procfs
from metald.backends.qemu.accel import host_tsc_khz
from metald.backends.qemu.cmdline import HostOptions, name_matches, qemu_argv
from metald.backends.qemu.files import RamFile, close_fds, open_vmm_files
from metald.backends.qemu.overlay import prepare_vm_dir
from metald.backends.vmm.console import ReadyWatch
from metald.domain import ids
from metald.domain.guest_args import guest_kernel_args
from metald.ports import DiskSpec, LaunchSpec
from tests.conftest import stop_and_sweep
from tests.support.daemon import Daemon
from tests.support.rpc import Rpc

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"


def _default_assets() -> Path:
    """As the tests find it: METALD_TEST_ASSETS, var/test-assets, or the daemon's default image dir."""
    given = os.environ.get("METALD_TEST_ASSETS")
    if given:
        return Path(given)
    local = REPO / "var" / "test-assets"
    return local if local.is_dir() else Path("/var/lib/metald/assets")


DEFAULT_ASSETS = _default_assets()
QEMU = "qemu-system-x86_64"  # the daemon's defaults (--qemu-binary, --qemu-img-binary)
QEMU_IMG = "qemu-img"
HAND_RAM = RamFile(Path("/dev/shm/metald-bench"))
MIB = 1024 * 1024
READY_POLL = 0.005  # how often the benchmark reads console logs, the same for both sides
CUSTOMER = "bench"

T = TypeVar("T")
R = TypeVar("R")


# ---- command line and workdir ------------------------------------------------------------------


def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    p.add_argument("--assets-dir", type=Path, default=DEFAULT_ASSETS, help="guest image (vmlinux, ...)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json", help="JSON results file")
    p.add_argument("--workdir", type=Path, default=None, help="scratch dir (default: a new temp dir)")
    return p


@contextlib.contextmanager
def workdir(given: Path | None) -> Iterator[Path]:
    """The scratch directory: the given one (kept), or a temporary one removed at the end."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given.resolve()
        return
    path = Path(tempfile.mkdtemp(prefix="metald-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---- the daemon ---------------------------------------------------------------------------------


@contextlib.contextmanager
def bench_daemon(root: Path, assets: Path, *extra_args: str, network: bool = False) -> Iterator[Daemon]:
    """A real `metald serve`, without networking unless `network` (then in a host namespace of its
    own); on exit it is stopped and every VMM and namespace it left is removed."""
    flags = () if network else ("--no-network-enabled",)
    daemon = Daemon(root / "daemon", assets.resolve(), *flags, *extra_args)
    try:
        yield daemon.start()
    finally:
        stop_and_sweep(daemon)
        kill_processes_under(root)


API = "api"  # the daemon as shipped: each VMM in its own cgroup (cpu quota = vCPUs x 1 core, memory cap)
API_NO_CGROUP = "api-no-cgroup"  # the same daemon given no cgroup hierarchy (--cgroup-root on an empty dir)
HAND = "hand"
SIDES = (API, API_NO_CGROUP, HAND)


@contextlib.contextmanager
def boot_daemons(root: Path, assets: Path, *extra_args: str) -> Iterator[dict[str, Daemon]]:
    """The two API sides of the boot benchmarks, each a daemon of its own."""
    no_cgroups = root / "no-cgroups"
    no_cgroups.mkdir(parents=True, exist_ok=True)
    with (
        bench_daemon(root / API, assets, *extra_args) as shipped,
        bench_daemon(root / API_NO_CGROUP, assets, "--cgroup-root", str(no_cgroups), *extra_args) as plain,
    ):
        yield {API: shipped, API_NO_CGROUP: plain}


def side_order(i: int) -> tuple[str, ...]:
    """Round i's order of the sides: rotated each round, so that none always goes first."""
    k = i % len(SIDES)
    return SIDES[k:] + SIDES[:k]


def daemon_pid(daemon: Daemon) -> int:
    assert daemon.proc is not None, "daemon not started"
    return daemon.proc.pid


def bench_rpc(daemon: Daemon, timeout: float = 900.0) -> Rpc:
    """A Connect-JSON client of the benchmark's customer, patient enough for boots on a busy host."""
    rpc = Rpc(daemon.url, CUSTOMER)
    rpc.client.timeout = httpx.Timeout(timeout)
    return rpc


def vm_config(memory_mib: int) -> dict[str, Any]:
    """The default guest (kernel, initrd, writable root on a qcow2 overlay), 1 vCPU."""
    return {"cpu": {"vcpu_count": 1}, "memory": {"size_bytes": memory_mib * MIB}}


def console_of(daemon: Daemon, vm_id: str) -> Path:
    return daemon.data_dir / "vms" / vm_id / "console.log"


def create_vms(rpc: Rpc, count: int, config: Mapping[str, Any], concurrency: int = 8) -> list[str]:
    return parallel_map(lambda _: rpc.create(dict(config)), range(count), concurrency)


def boot_vm(rpc: Rpc, vm_id: str, timeout: float) -> float:
    """BootVm with wait_for_ready; returns the monotonic time the call returned."""
    rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True, "wait_timeout_seconds": timeout})
    return time.monotonic()


def delete_vms(rpc: Rpc, vm_ids: Iterable[str], concurrency: int = 8) -> None:
    parallel_map(lambda vm_id: rpc.ok("DeleteVm", {"vm_id": vm_id, "force": True}), vm_ids, concurrency)


# ---- QEMU by hand ---------------------------------------------------------------------------------


def host_options() -> HostOptions:
    """What the daemon decides for a TCG launch (same binary, same TSC hint, sandbox on)."""
    return HostOptions(binary=QEMU, accel="tcg", tsc_khz=host_tsc_khz())


def launch_spec(assets: Path, vm_dir: Path, vm_id: str, memory_mib: int) -> LaunchSpec:
    """The LaunchSpec the daemon derives from vm_config(memory_mib) without networking."""
    assets = assets.resolve()
    return LaunchSpec(
        vm_id=vm_id,
        vm_dir=vm_dir,
        vcpu_count=1,
        memory_bytes=memory_mib * MIB,
        cpu_template="",
        kernel=assets / "vmlinux",
        initrd=assets / "initrd",
        customer_kernel_args="",
        guest_kernel_args=guest_kernel_args(vm_id, ()),
        disks=(DiskSpec("rootfs", assets / "rootfs.ext4", read_only=False, is_root=True),),
        nics=(),
        netns=None,
        console_type="SERIAL",
        console_path=vm_dir / "console.log",
    )


@dataclass
class HandVm:
    """One QEMU started directly by the benchmark (its parent, so it is reaped)."""

    spec: LaunchSpec
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def prepare(cls, root: Path, assets: Path, memory_mib: int) -> HandVm:
        """Directory and qcow2 overlay, made by the daemon's own code (what CreateVm does)."""
        vm_id = ids.new_vm_id()
        spec = launch_spec(assets, root / vm_id, vm_id, memory_mib)
        asyncio.run(prepare_vm_dir(spec, qemu_img=QEMU_IMG))
        return cls(spec)

    def start(self) -> None:
        """Open the VM's files (as the daemon does at boot) and exec QEMU on them."""
        fds = open_vmm_files(self.spec, HAND_RAM)  # guest RAM in a file, as the daemon does
        try:
            with open(self.spec.vm_dir / "vmm.log", "ab") as log:
                self.proc = subprocess.Popen(
                    qemu_argv(self.spec, host_options(), fds),
                    cwd=self.spec.vm_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=fds.all(),
                )
        finally:
            close_fds(fds)

    def destroy(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        shutil.rmtree(self.spec.vm_dir, ignore_errors=True)


@contextlib.contextmanager
def hand_vms(root: Path, assets: Path, count: int, memory_mib: int) -> Iterator[list[HandVm]]:
    vms = parallel_map(lambda _: HandVm.prepare(root, assets, memory_mib), range(count), 8)
    try:
        yield vms
    finally:
        for vm in vms:
            vm.destroy()


# ---- ready lines ----------------------------------------------------------------------------------


async def _wait_ready(watches: Mapping[str, ReadyWatch], timeout: float) -> dict[str, float]:
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(watches):
        for vm_id, watch in watches.items():
            if vm_id not in seen and await watch.poll():
                seen[vm_id] = time.monotonic()
        if time.monotonic() > deadline:
            missing = sorted(set(watches) - set(seen))
            raise TimeoutError(f"no ready line within {timeout:g}s from {missing}")
        await asyncio.sleep(READY_POLL)
    return seen


def wait_ready(consoles: Mapping[str, Path], timeout: float) -> dict[str, float]:
    """Monotonic time at which each console first showed `METALD_READY vm_id=<id>` (the daemon's
    own ReadyWatch does the scanning), polled every READY_POLL seconds."""
    watches = {vm_id: ReadyWatch(path, vm_id, 0) for vm_id, path in consoles.items()}
    return asyncio.run(_wait_ready(watches, timeout))


# ---- one boot, measured the same way on both sides ---------------------------------------------------


@dataclass(frozen=True)
class Boot:
    ready: list[float]  # seconds from the start to each VM's ready line, ascending
    returned: list[float]  # API only: seconds until each BootVm(wait_for_ready) call returned
    spawned: list[float]  # seconds from the start to each QEMU process's birth (10 ms resolution)

    @property
    def wall(self) -> float:
        return self.ready[-1]


def boot_through_api(rpc: Rpc, daemon: Daemon, vm_ids: Sequence[str], timeout: float) -> Boot:
    """BootVm for every (CREATED) VM at once, each call in its own thread; the clock starts just
    before the first call and stops at each console's ready line."""
    consoles = {vm_id: console_of(daemon, vm_id) for vm_id in vm_ids}
    with ThreadPoolExecutor(max_workers=len(vm_ids)) as pool:
        started = time.monotonic()
        calls = [pool.submit(boot_vm, rpc, vm_id, timeout) for vm_id in vm_ids]
        seen = wait_ready(consoles, timeout)
        returned = [call.result() for call in calls]
    births = [started_at(pid) - started for pid in qemu_pids(vm_ids).values()]
    return Boot(
        sorted(t - started for t in seen.values()), sorted(t - started for t in returned), sorted(births)
    )


def boot_by_hand(vms: Sequence[HandVm], timeout: float) -> Boot:
    """Start every prepared QEMU at once; the clock starts just before the first spawn."""
    started = time.monotonic()
    for vm in vms:
        vm.start()
    seen = wait_ready({vm.spec.vm_id: vm.spec.console_path for vm in vms}, timeout)
    births = [started_at(vm.proc.pid) - started for vm in vms if vm.proc is not None]
    return Boot(sorted(t - started for t in seen.values()), [], sorted(births))


# ---- processes ------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status (VmRSS, RssAnon, ...) and Threads; {} if it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                parts = value.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def pss_kib(pid: int) -> int:
    """Proportional set size (shared pages split among their users), 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def qemu_pids(vm_ids: Iterable[str]) -> dict[str, int]:
    """The live QEMU process of each VM, found by its `-name` (as the daemon re-adopts them)."""
    wanted = set(vm_ids)
    found: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = procfs.read_cmdline(int(entry))
        if not argv or not argv[0].endswith(QEMU):
            continue
        stat = procfs.read_stat(int(entry))
        vm_id = next((v for v in wanted if name_matches(argv, v)), None)
        if vm_id is not None and stat is not None and stat.state != "Z":
            found[vm_id] = int(entry)
    return found


def kill_processes_under(root: Path) -> None:
    """SIGKILL every process whose working directory is below `root` (VMMs, supervisors)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and procfs.read_cwd(int(entry)).startswith(f"{root}/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)


def started_at(pid: int) -> float:
    """When the process was born, on time.monotonic()'s clock (CLOCK_MONOTONIC and /proc's start
    times both count from boot here: no suspend), to the kernel's clock tick (10 ms)."""
    stat = procfs.read_stat(pid)
    return stat.start_time / os.sysconf("SC_CLK_TCK") if stat else float("nan")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads) so far."""
    stat = procfs.read_stat(pid)
    return stat.cpu_time_nanos / 1e9 if stat else 0.0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    return int(raw[raw.rindex(b")") + 2 :].split()[1])


# ---- numbers, tables, results ---------------------------------------------------------------------


def parallel_map(fn: Callable[[T], R], items: Iterable[T], concurrency: int) -> list[R]:
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(fn, items))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers], *([_fmt(v) for v in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.strip().splitlines()[0] if out.strip() else ""


def machine_context() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "",
    )
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": _first_line([QEMU, "-version"]),
        "git_commit": _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "loadavg_at_start": os.getloadavg(),
        "cpu_pressure_at_start": cpu_pressure(),
    }


def cpu_pressure() -> str:
    """The `some` line of /proc/pressure/cpu: share of time runnable tasks waited for a CPU."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return ""


def write_results(
    bench: str, argv: Sequence[str], args: argparse.Namespace, context: dict[str, Any], results: Any
) -> None:
    """bench/results/<bench>.json (or --out): the command, its parameters, the machine, the numbers."""
    context = {**context, "loadavg_at_end": os.getloadavg(), "cpu_pressure_at_end": cpu_pressure()}
    params = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {
        "benchmark": bench,
        "command": " ".join([".venv/bin/python", "-m", f"bench.{bench}", *argv]),
        "params": params,
        "machine": context,
        "results": results,
    }
    path: Path = args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nresults: {path}")
