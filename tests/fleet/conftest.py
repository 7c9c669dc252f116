"""One fleet (PostgreSQL, three hosts in their own namespaces, two gateways) for the fleet tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet.cluster import Fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("fleet"), assets_dir)
    try:
        yield f.start()
    finally:
        f.destroy()
