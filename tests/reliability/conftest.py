"""Fixtures of the reliability suite: daemons of each test's own, always cleaned up."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import stop_and_sweep
from tests.reliability.host import (
    cgroups_of,
    daemon_namespaces,
    kill_processes,
    remove_cgroups,
    remove_namespaces,
)
from tests.support.daemon import Daemon

MakeDaemon = Callable[..., Daemon]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "reliability: the reliability suite (docs/reliability.md)")


def clean_up(daemon: Daemon) -> None:
    """Stop it; kill its VMMs; delete its host namespace, its VMs' namespaces and their cgroups."""
    stop_and_sweep(daemon)
    kill_processes(daemon.data_dir)  # VMMs that tests.support's sweep may not recognise
    remove_namespaces(daemon_namespaces(daemon.host_netns))
    vms_dir = daemon.data_dir / "vms"
    if vms_dir.is_dir():
        remove_cgroups(cgroups_of([d.name for d in vms_dir.iterdir()], vms_dir))


@contextlib.contextmanager
def own_daemon(data_dir: Path, assets_dir: Path, *flags: str, name: str) -> Iterator[Daemon]:
    """A started daemon, cleaned up afterwards. Names of daemons alive at once must differ in their
    last three characters (they name the host namespace)."""
    daemon = Daemon(data_dir, assets_dir, *flags, name=name)
    try:
        yield daemon.start()
    finally:
        clean_up(daemon)


@pytest.fixture
def make_daemon(tmp_path: Path, assets_dir: Path) -> Iterator[MakeDaemon]:
    """make_daemon(*flags, name=..., data_dir=None) starts a daemon, cleaned up after the test."""
    with contextlib.ExitStack() as stack:

        def make(*flags: str, name: str, data_dir: Path | None = None) -> Daemon:
            return stack.enter_context(own_daemon(data_dir or tmp_path / name, assets_dir, *flags, name=name))

        yield make
