"""ExecVm round trip for `true` (p50, p99) and WriteFile / ReadFile throughput, through the API
(Connect, binary proto) to a real guest's agent. `python -m bench.guest_exec [--execs N]`."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from connectrpc.codec import proto_binary_codec

from bench.common import CUSTOMER, bench_daemon, bench_rpc, machine_context, parser, workdir, write_results
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.gen.vmprovisioner.v1.vm_connect import VmServiceClient
from tests.support.rpc import token

MIB = 1 << 20


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(url: str, vm_id: str, execs: int, file_mib: int, file_rounds: int) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {token(CUSTOMER)}"}
    async with VmServiceClient(url, codec=proto_binary_codec(), read_max_bytes=64 * MIB) as client:
        request = pb.ExecVmRequest(vm_id=vm_id, command=["true"])
        for _ in range(5):  # warm-up: connection, TCG translation of the agent's paths
            await client.exec_vm(request, headers=headers)
        rtts = []
        for _ in range(execs):
            started = time.perf_counter()
            await client.exec_vm(request, headers=headers)
            rtts.append((time.perf_counter() - started) * 1000)
        content = os.urandom(file_mib * MIB)
        writes, reads = [], []
        for _ in range(file_rounds):
            started = time.perf_counter()
            await client.write_file(
                pb.WriteFileRequest(vm_id=vm_id, path="/tmp/bench", content=content), headers=headers
            )
            writes.append(file_mib / (time.perf_counter() - started))
            started = time.perf_counter()
            got = await client.read_file(pb.ReadFileRequest(vm_id=vm_id, path="/tmp/bench"), headers=headers)
            reads.append(file_mib / (time.perf_counter() - started))
            assert got.content == content
    return {
        "exec_true_ms": {
            "p50": percentile(rtts, 0.5),
            "p99": percentile(rtts, 0.99),
            "mean": statistics.mean(rtts),
            "n": execs,
        },
        "write_file_mb_per_s": {"median": statistics.median(writes), "file_mib": file_mib, "n": file_rounds},
        "read_file_mb_per_s": {"median": statistics.median(reads), "file_mib": file_mib, "n": file_rounds},
    }


def main(argv: Sequence[str]) -> int:
    p = parser("guest_exec", __doc__ or "")
    p.add_argument("--execs", type=int, default=200)
    p.add_argument("--file-mib", type=int, default=16)
    p.add_argument("--file-rounds", type=int, default=5)
    args = p.parse_args(argv)
    with (
        workdir(args.workdir) as root,
        bench_daemon(root, args.assets_dir, "--max-request-bytes", str(20 * MIB)) as daemon,
    ):
        context = machine_context()
        rpc = bench_rpc(daemon)
        vm_id = rpc.create({}, vm_id="bench-exec")
        rpc.ok("BootVm", {"vm_id": vm_id, "wait_for_ready": True})
        results = asyncio.run(measure(daemon.url, vm_id, args.execs, args.file_mib, args.file_rounds))
        rpc.ok("DeleteVm", {"vm_id": vm_id, "force": True})
    print(results)
    write_results("guest_exec", argv, args, context, results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
