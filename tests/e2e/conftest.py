"""Fixtures shared by the e2e tests that drive QemuBackend directly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from metald.backends import procfs
from metald.backends.qemu.backend import QemuBackend

Events = list[tuple[str, str]]


async def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Whether `predicate` came true within `timeout` seconds (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def tcg_backend(state_dir: Path, **options: Any) -> QemuBackend:
    """A QemuBackend (one "daemon") on TCG with no probe assets; `options`: sandbox, ram_dir, other
    binaries, ..."""
    tools = {"qemu_binary": "qemu-system-x86_64", "qemu_img_binary": "qemu-img"}
    return QemuBackend(
        accel="tcg",
        state_dir=state_dir,
        probe_kernel=None,
        probe_initrd=None,
        probe_rootfs=None,
        **{**tools, **options},
    )


def kill_processes_under(root: Path) -> None:
    """Kill every process (QEMU, supervisor) whose working directory is below `root`."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and procfs.read_cwd(int(entry)).startswith(str(root)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)


@pytest.fixture
async def backends(tmp_path: Path) -> AsyncIterator[Callable[..., QemuBackend]]:
    """Makes QEMU backends (each one a "daemon", TCG) recording exit events in the list given, with
    sandbox options (vmm_user, cgroups, ...) as keywords; closes them and kills every VM at the end."""
    made: list[QemuBackend] = []

    def make(events: Events, **sandbox: object) -> QemuBackend:
        backend = tcg_backend(tmp_path / "state", **sandbox)

        async def listener(vm_id: str, reason: str) -> None:
            events.append((vm_id, reason))

        backend.set_exit_listener(listener)
        made.append(backend)
        return backend

    try:
        yield make
    finally:
        for backend in made:
            await backend.close()
        kill_processes_under(tmp_path)
