"""Host tools the backends run (qemu-img, cp, the VMM binary): one way to run them and to map their
failures to errors: a tool that is not installed is UNAVAILABLE (the host, not the request, is
wrong; /health says so too), a full disk is DISK_FULL, anything else INTERNAL with the tool's words."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Sequence
from pathlib import Path

from metald.domain.errors import MetaldError, disk_full, internal, unavailable

_NO_SPACE = ("No space left", "Disk quota exceeded")


def tool_missing(tool: str, cause: BaseException | None = None) -> MetaldError:
    detail = f": {cause}" if cause is not None else ""
    return unavailable("HOST_TOOL_MISSING", f"{tool} is not installed on this host{detail}", tool=tool)


async def run_tool(argv: Sequence[str], *, failure: str, reason: str, partial: Path | None = None) -> None:
    """Run `argv` to its end; on failure remove `partial` (a file it was writing) and raise."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EACCES):
            raise tool_missing(argv[0], e) from e
        raise
    out, _ = await proc.communicate()
    if proc.returncode == 0:
        return
    if partial is not None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(partial.unlink)
    text = out.decode(errors="replace").strip()
    if any(marker in text for marker in _NO_SPACE):
        raise disk_full(f"no space left for the VM's disk: {text}")
    raise internal(reason, f"{failure}: {text}")


async def tool_version(binary: str, flag: str = "--version", timeout: float = 5.0) -> tuple[bool, str]:
    """(True, the first line of `binary flag`) if it runs and succeeds, else (False, why)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            binary,
            flag,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        return False, f"{binary}: {exc.strerror or exc}"
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False, f"{binary} {flag} did not answer within {timeout:g}s"
    first = next(iter(out.decode(errors="replace").strip().splitlines()), "")
    if proc.returncode != 0:
        return False, f"{binary} {flag} failed (rc {proc.returncode}): {first}"
    return True, first or binary
