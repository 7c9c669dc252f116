"""Subprocess helpers for the guest builder: async execution and host-tool checks."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Mapping
from pathlib import Path


class GuestBuildError(RuntimeError):
    """The guest image could not be built (missing tool, apt failure, bad kernel package, ...)."""


# Host tools the builder always needs, with the Debian package that provides each.
REQUIRED_TOOLS: Mapping[str, str] = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "depmod": "kmod",
    "mkfs.ext4": "e2fsprogs",
    "gcc": "gcc libc6-dev",  # the guest agent is compiled statically (libc.a is in libc6-dev)
}


def require_tools(tools: Mapping[str, str]) -> None:
    """Raise GuestBuildError naming the apt packages to install for every tool not on PATH."""
    missing = {tool: pkg for tool, pkg in tools.items() if _which(tool) is None}
    if missing:
        names = ", ".join(sorted(missing))
        pkgs = " ".join(sorted(set(missing.values())))
        raise GuestBuildError(f"missing host tools: {names} (install with: apt-get install -y {pkgs})")


def _which(tool: str) -> str | None:
    # depmod and mkfs.ext4 live in /usr/sbin, which a non-root PATH may lack.
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


async def run(*argv: str, cwd: Path | None = None, stdin: bytes | None = None) -> bytes:
    """Run argv without blocking the event loop; return stdout, raise GuestBuildError on failure."""
    exe = _which(argv[0]) or argv[0]
    try:
        proc = await asyncio.create_subprocess_exec(
            exe,
            *argv[1:],
            cwd=cwd,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise GuestBuildError(f"cannot run {argv[0]}: {exc}") from exc
    try:
        out, err = await proc.communicate(stdin)
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        detail = err.decode(errors="replace").strip()[-2000:]
        raise GuestBuildError(f"{' '.join(argv)} failed (exit {proc.returncode}): {detail}")
    return out
