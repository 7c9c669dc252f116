"""One fleet (PostgreSQL, three hosts in their own namespaces, two gateways) for the fleet tests."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet.cluster import GATEWAY_SERVER, Fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Iterator[Fleet]:
    if GATEWAY_SERVER == "pyvoy" and importlib.util.find_spec("pyvoy") is None:
        pytest.skip("METALD_TEST_GATEWAY_SERVER=pyvoy needs pyvoy: pip install -e '.[pyvoy]'")
    f = Fleet(tmp_path_factory.mktemp("fleet"), assets_dir)
    try:
        yield f.start()
    finally:
        f.destroy()
