"""Connecting to a UNIX socket inside a VM directory whatever that directory's length."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

_RETRY_INTERVAL = 0.02


async def open_in_dir(
    vm_dir: Path,
    name: str,
    *,
    timeout: float,
    limit: int = 1 << 16,
    alive: Callable[[], bool] = lambda: True,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to vm_dir/name, retrying until it accepts (QEMU creates it a few ms after starting),
    `timeout` passes or `alive()` turns false.

    The path goes through /proc/self/fd/N of an O_PATH handle on vm_dir: AF_UNIX paths are limited to
    108 bytes and vm_dir may be longer.
    """
    deadline = time.monotonic() + timeout
    while True:
        dir_fd = os.open(vm_dir, os.O_PATH | os.O_DIRECTORY)
        try:
            return await asyncio.open_unix_connection(f"/proc/self/fd/{dir_fd}/{name}", limit=limit)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() >= deadline or not alive():
                raise
        finally:
            os.close(dir_fd)
        await asyncio.sleep(_RETRY_INTERVAL)
