"""Maps the customer-visible /assets/ paths onto the host's image directory, refusing escapes."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from metald.domain.errors import invalid
from metald.domain.validation import ASSETS_PREFIX


class AssetResolver:
    def __init__(self, root: Path) -> None:
        self.root = root

    async def resolve(self, virtual_path: str, field: str) -> Path:
        """The canonical host path of a regular file under the assets root (symlinks resolved)."""
        return await asyncio.to_thread(self._resolve, virtual_path, field)

    def _resolve(self, virtual_path: str, field: str) -> Path:
        root = self.root.resolve()
        candidate = root / virtual_path.removeprefix(ASSETS_PREFIX)
        real = Path(os.path.realpath(candidate))
        if not real.is_relative_to(root):
            raise invalid(field, f"{virtual_path} resolves outside {ASSETS_PREFIX}")
        try:
            st = real.stat()
        except FileNotFoundError:
            raise invalid(field, f"{virtual_path} does not exist") from None
        if not stat.S_ISREG(st.st_mode):
            raise invalid(field, f"{virtual_path} is not a regular file")
        return real
