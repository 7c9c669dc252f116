"""Async runner for ip, tc, nft and sysctl, each aimed at a network namespace ("" = root).

Failures become MetaldError INTERNAL carrying the command and its stderr; a missing tool becomes
UNAVAILABLE naming the Debian package to install.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metald.domain.errors import MetaldError, internal, unavailable

NETNS_RUN_DIR = Path("/run/netns")  # where `ip netns add` mounts named namespaces
TIMEOUT_SECONDS = 30.0
_PACKAGES = {"ip": "iproute2", "tc": "iproute2", "nft": "nftables", "sysctl": "procps"}
_ENV = {**os.environ, "LC_ALL": "C"}


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def error(self) -> MetaldError:
        command = " ".join(self.argv)
        return internal(
            "NETWORK_COMMAND_FAILED",
            f"network command failed ({self.returncode}): {command}: {self.stderr.strip()}",
            command=command,
        )


async def run(*argv: str, stdin: str | None = None) -> Completed:
    """Run argv without a shell; returns whatever the exit status (see check())."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_ENV,
        )
    except FileNotFoundError as exc:
        tool = argv[0]
        raise unavailable(
            "NETWORK_TOOL_MISSING", f"{tool} not found (apt-get install {_PACKAGES.get(tool, tool)})"
        ) from exc
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), TIMEOUT_SECONDS
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return Completed(argv, -9, "", f"timed out after {TIMEOUT_SECONDS:.0f}s")
    return Completed(argv, proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))


async def check(*argv: str, stdin: str | None = None) -> str:
    """Run argv; stdout on success, MetaldError INTERNAL otherwise."""
    done = await run(*argv, stdin=stdin)
    if not done.ok:
        raise done.error()
    return done.stdout


def ip(netns: str, *args: str) -> tuple[str, ...]:
    return ("ip", "-n", netns, *args) if netns else ("ip", *args)


def tc(netns: str, *args: str) -> tuple[str, ...]:
    return ("tc", "-n", netns, *args) if netns else ("tc", *args)


def in_netns(netns: str, *argv: str) -> tuple[str, ...]:
    """argv run inside netns, for tools without a namespace option (nft, sysctl)."""
    return ("ip", "netns", "exec", netns, *argv) if netns else argv


async def batch(argv: tuple[str, ...], lines: list[str]) -> None:
    """`ip|tc ... -batch -`: many operations for the price of one process; stops at the first error."""
    if lines:
        await check(*argv, "-batch", "-", stdin="\n".join(lines) + "\n")


async def links(netns: str) -> list[dict[str, Any]]:
    """`ip -j link show` of a namespace (for set-up; reads per request use netlink.LinkReader)."""
    out = await check(*ip(netns, "-j", "link", "show"))
    return parse_list(out)


async def netns_names() -> list[str]:
    return [str(entry["name"]) for entry in parse_list(await check("ip", "-j", "netns", "list"))]


def netns_exists(netns: str) -> bool:
    """True for the root namespace ("") and for a named namespace that is mounted (a tmpfs stat)."""
    return not netns or (NETNS_RUN_DIR / netns).exists()


async def sysctl(netns: str, settings: dict[str, str]) -> None:
    await check(*in_netns(netns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())))


def parse_list(out: str) -> list[dict[str, Any]]:
    data = json.loads(out) if out.strip() else []
    if not isinstance(data, list):
        raise internal("NETWORK_COMMAND_FAILED", f"unexpected ip JSON: {out[:200]}")
    return data
