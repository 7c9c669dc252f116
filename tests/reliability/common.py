"""Knobs of the reliability suite (CI form by default, long form with METALD_RELIABILITY_LONG=1)
and small helpers shared by its tests."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

LONG = os.environ.get("METALD_RELIABILITY_LONG", "") not in ("", "0")


def knob(name: str, ci: int, long: int) -> int:
    """METALD_RELIABILITY_<NAME> if set, else the CI or the long form's value."""
    value = os.environ.get(f"METALD_RELIABILITY_{name}")
    return int(value) if value else (long if LONG else ci)


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll probe() until it returns something truthy; AssertionError naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g}s: {what} (last: {value!r})")
        time.sleep(interval)
