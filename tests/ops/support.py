"""Helpers of the operations tests: Prometheus scrapes, polling, CLI runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import REPO

T = TypeVar("T")
METALCTL = [str(Path(sys.executable).parent / "metalctl")]  # the installed entry point


class Samples:
    """One /metrics scrape: value(name, **labels) is the sample's value (0 when absent)."""

    def __init__(self, text: str) -> None:
        self.values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.values[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.values.get((name, frozenset(labels.items())), 0.0)


def scrape(url: str) -> Samples:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Samples(response.text)


def eventually(probe: Callable[[], T | None], timeout: float = 20, what: str = "condition") -> T:
    """Poll `probe` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def metalctl(
    *args: str, url: str, token: str = "", env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a subprocess (flags after the command, as a user would type them)."""
    environ = {**os.environ, "METALD_URL": url, "METALD_TOKEN": token, **(env or {})}
    return subprocess.run(
        [*METALCTL, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=environ
    )
