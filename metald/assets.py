"""Maps the customer-visible /assets/ paths onto the host's image directory, refusing escapes.

A path is opened (O_PATH: no read, no side effects even on a device or FIFO) and judged by what
was actually opened: its canonical path from /proc/self/fd and its fstat. The canonical path,
free of symlinks, is what the VMM is given, so a symlink swapped after this check changes nothing;
only whoever can write the assets directory itself could still replace a file (docs/security.md).
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from metald.domain.errors import denied, invalid
from metald.domain.validation import ASSETS_PREFIX


class AssetResolver:
    def __init__(self, root: Path, *, private: Sequence[Path] = ()) -> None:
        """`private`: path prefixes of the daemon's own state (VM directories, the database) that are
        never an asset, should the assets root be configured to contain them."""
        self.root = root
        self._private = tuple(str(p.resolve()) for p in private)

    async def resolve(self, virtual_path: str, field: str) -> Path:
        """The canonical host path of a regular file under the assets root."""
        return await asyncio.to_thread(self._resolve, virtual_path, field)

    def _resolve(self, virtual_path: str, field: str) -> Path:
        root = self.root.resolve()
        candidate = root / virtual_path.removeprefix(ASSETS_PREFIX)
        try:
            fd = os.open(candidate, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            if not Path(os.path.realpath(candidate)).is_relative_to(root):
                raise invalid(field, f"{virtual_path} resolves outside {ASSETS_PREFIX}") from None
            raise invalid(field, f"{virtual_path} does not exist") from None
        except OSError:
            raise invalid(field, f"{virtual_path} cannot be opened") from None
        try:
            real = Path(os.readlink(f"/proc/self/fd/{fd}"))
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not real.is_relative_to(root):
            raise invalid(field, f"{virtual_path} resolves outside {ASSETS_PREFIX}")
        if str(real).startswith(self._private):
            raise denied(
                "PATH_NOT_PERMITTED",
                f"{field}: {virtual_path} is VM state kept by metald, not an asset",
                field=field,
            )
        if not stat.S_ISREG(st.st_mode) or st.st_nlink == 0:
            raise invalid(field, f"{virtual_path} is not a regular file")
        return real
