"""The C launcher (vmm/launch.c) that starts each supervisor: compiled once by the daemon with gcc,
into a per-user cache keyed by the source's hash (temp file + rename: concurrent daemons are safe),
off the event loop. Without gcc (and no cached build) a VM start is UNAVAILABLE HOST_TOOL_MISSING."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from metald.backends.vmm.tools import run_tool

SOURCE = Path(__file__).with_name("launch.c")
CFLAGS = ("-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror")  # static: no dynamic loader at start
_built: dict[Path, Path] = {}  # cache dir -> the launcher built there by this process


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metald"


def _target(directory: Path) -> tuple[Path, bytes]:
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(b"\0".join([*(f.encode() for f in CFLAGS), source])).hexdigest()[:16]
    return directory / f"launch-{digest}", source


async def launcher(directory: Path | None = None, *, compiler: str = "gcc") -> Path:
    """The launcher's path, compiled into `directory` (default: cache_dir()) if it is not there."""
    directory = directory or cache_dir()
    if (known := _built.get(directory)) is not None:
        return known
    target, source = await asyncio.to_thread(_target, directory)
    if not await asyncio.to_thread(os.access, target, os.X_OK):
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=".launch-", dir=directory))
        try:
            src = tmp / "launch.c"
            await asyncio.to_thread(src.write_bytes, source)
            out = tmp / "launch"
            await run_tool(
                [compiler, *CFLAGS, "-o", str(out), str(src)],
                failure="cannot compile the VMM launcher",
                reason="LAUNCHER_BUILD_FAILED",
            )
            await asyncio.to_thread(os.replace, out, target)
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
    _built[directory] = target
    return target
