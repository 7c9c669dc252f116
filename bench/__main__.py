"""`python -m bench`: every benchmark with its small defaults, one after the other (about 15 minutes)."""

from __future__ import annotations

import sys

from bench import api_load, boot_overhead, cost_per_vm, guest_exec, parallel_boots


def main() -> int:
    for bench in (boot_overhead, parallel_boots, api_load, cost_per_vm, guest_exec):
        print(f"\n===== {bench.__name__} =====", flush=True)
        bench.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
