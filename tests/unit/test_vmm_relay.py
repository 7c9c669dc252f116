"""The bounded console log (vmm/relay.py) and the ready watch following it across rotations."""

from __future__ import annotations

import os
from pathlib import Path

from metald.backends.vmm.console import ReadyWatch
from metald.backends.vmm.relay import Relay, rotated


def _relay(path: Path, bound: int, *chunks: bytes) -> None:
    read, write = os.pipe()
    thread = Relay(read, path, bound).start()
    for chunk in chunks:
        os.write(write, chunk)
    os.close(write)
    thread.join(10)


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_the_log_keeps_the_newest_output_within_the_bound(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    _relay(log, 64 * 1024, *([b"x" * 4096] * 100), b"THE END\n")
    assert log.stat().st_size + rotated(log).stat().st_size <= 64 * 1024
    assert log.read_bytes().endswith(b"THE END\n")


async def test_the_ready_line_is_found_across_a_rotation(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"boot 1\n")
    watch = ReadyWatch(log, "vm-1", 0)
    assert not await watch.poll()
    _append(log, b"METALD_READY vm_id=vm-1 boot_id=b\n")
    os.replace(log, rotated(log))  # the relay rotates before the watch looked again
    log.write_bytes(b"later output\n")
    assert await watch.poll()


async def test_a_reset_waits_for_a_new_ready_line(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"METALD_READY vm_id=vm-1 boot_id=a\n")
    watch = ReadyWatch(log, "vm-1", 0)
    assert await watch.poll()
    watch.restart()
    assert not await watch.poll()
    _append(log, b"METALD_READY vm_id=vm-1 boot_id=b\n")
    assert await watch.poll()
