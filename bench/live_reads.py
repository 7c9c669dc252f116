"""What each of GetVmInfo's live reads costs, in process, for one running TCG guest (issue 16).

One QEMU started by hand (bench.common.HandVm, the daemon's argv), the daemon's own QMP client on its
socket, and a network namespace made by this benchmark with a TAP and a veth pair in it (no traffic
is sent anywhere). Each read runs `--calls` times back to back; the table gives the wall time per
call (p50, mean) and this process's CPU per call. The ways compared: query-status then
query-blockstats (two round trips, as before) against both sent before either answer is read; the
/proc files read before (stat + status) and now (stat + statm); the netlink dump of the namespace.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import common
from metald.backends import procfs
from metald.backends.qemu import layout
from metald.backends.qemu.qmp import QmpClient
from metald.network.netlink import LinkReader


async def _timed(calls: int, once: Callable[[], Awaitable[Any]]) -> tuple[float, float, float]:
    """(p50 wall ms, mean wall ms, CPU ms) per call."""
    walls: list[float] = []
    cpu0 = time.process_time()
    for _ in range(calls):
        t0 = time.perf_counter()
        await once()
        walls.append((time.perf_counter() - t0) * 1000)
    cpu = (time.process_time() - cpu0) * 1000 / calls
    return common.median(walls), sum(walls) / calls, cpu


def _old_rss(pid: int) -> int:
    """VmRSS as read before this change: the whole /proc/PID/status, line by line."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def _measure(vm: common.HandVm, netns: str, calls: int) -> list[tuple[str, float, float, float]]:
    assert vm.proc is not None
    pid = vm.proc.pid
    qmp = await QmpClient.connect(vm.spec.vm_dir, layout.QMP_SOCKET)
    reader = LinkReader()
    try:

        async def status() -> None:
            await qmp.execute("query-status")

        async def blockstats() -> None:
            await qmp.execute("query-blockstats")

        async def sequential() -> None:
            await qmp.execute("query-status")
            await qmp.execute("query-blockstats")

        async def pipelined() -> None:
            await asyncio.gather(qmp.execute("query-status"), qmp.execute("query-blockstats"))

        async def proc_old() -> None:
            procfs.read_stat(pid)
            _old_rss(pid)

        async def proc_new() -> None:
            procfs.read_stat(pid)
            procfs.read_rss_bytes(pid)

        async def links() -> None:
            assert await reader.links(netns) is not None

        cases: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("QMP query-status", status),
            ("QMP query-blockstats", blockstats),
            ("QMP both, one after the other", sequential),
            ("QMP both, pipelined", pipelined),
            ("/proc stat + status (before)", proc_old),
            ("/proc stat + statm (now)", proc_new),
            ("netlink links of the namespace", links),
        ]
        rows = []
        for _ in range(2):  # the first pass warms up; the second is reported
            rows = [(name, *await _timed(calls, once)) for name, once in cases]
        return rows
    finally:
        reader.close()
        await qmp.close()


def _netns(name: str, *commands: str) -> None:
    for command in commands:
        subprocess.run(["ip", "-n", name, *command.split()], check=True)


def _boot(vm: common.HandVm) -> str:
    """Start the guest and wait for its ready line; the reads are measured either way."""
    vm.start()
    try:
        common.wait_ready({vm.spec.vm_id: vm.spec.console_path}, 60)
    except TimeoutError:
        for name in ("vmm.log", "console.log"):
            path = vm.spec.vm_dir / name
            print(f"--- {name}:", path.read_text(errors="replace")[-600:] if path.exists() else "(none)")
        return "not ready after 60 s"
    return "ready"


def main() -> None:
    p = common.parser("live_reads", "The cost of each live read of GetVmInfo, in process.")
    p.add_argument("--calls", type=int, default=2000, help="calls per read")
    args = p.parse_args()
    netns = f"metald-bench-{uuid.uuid4().hex[:8]}"
    with common.workdir(args.workdir) as root, common.hand_vms(root, args.assets_dir, 1, 256) as vms:
        state = _boot(vms[0])
        subprocess.run(["ip", "netns", "add", netns], check=True)
        try:
            _netns(netns, "tuntap add dev tap0 mode tap", "link add v0 type veth peer name v1")
            rows = asyncio.run(_measure(vms[0], netns, args.calls))
        finally:
            subprocess.run(["ip", "netns", "del", netns], check=False)
    load = Path("/proc/loadavg").read_text().split()[0]
    common.print_table(
        f"live reads, {args.calls} calls each, guest {state}, load {load}",
        ["read", "p50 ms", "mean ms", "CPU ms/call"],
        [(name, f"{p50:.3f}", f"{mean:.3f}", f"{cpu:.3f}") for name, p50, mean, cpu in rows],
    )


if __name__ == "__main__":
    main()
