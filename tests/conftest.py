"""Shared fixtures: the guest image, a running metald, per-test customers and clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from metald.network import LinuxNetwork
from metald.store.sqlite import SqliteStore
from tests.support.daemon import REPO, Daemon, kill_leftovers
from tests.support.rpc import Rpc

# A run started in the background of a script inherits SIGINT ignored, and so would every process
# the tests start (the Ctrl-C tests of `metalctl watch` then fail): take the default back, which
# the children get as SIG_DFL at their exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

D = TypeVar("D", bound=Daemon)


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """The default guest image (built once; the builder is idempotent and fast when up to date)."""
    path = Path(os.environ.get("METALD_TEST_ASSETS", REPO / "var" / "test-assets"))
    from metald.guest.builder import build_guest_image

    asyncio.run(build_guest_image(path, REPO / "var" / "cache"))
    return path


def _netns_with_prefix(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


async def _sweep_vm_namespaces(daemon: Daemon) -> list[str]:
    """What the daemon's own orphan sweep does at start-up, for VMs a stopped daemon left running."""
    store = await SqliteStore.open(daemon.data_dir / "metald.db")
    try:
        network = LinuxNetwork(
            store.addresses,
            host_netns=daemon.host_netns,
            ipv4_pool="10.240.0.0/16",
            ipv6_pool="fd6d:6574:616c::/48",
            allow_egress=False,
        )
        await network.unhold(None)  # the TAP holders of warm pool slots
        return await network.remove_orphans(set())
    finally:
        await store.close()


@contextlib.contextmanager
def serving(daemon: D) -> Iterator[D]:
    """`daemon` started; afterwards stopped and swept (stop_and_sweep), whatever happened."""
    daemon.start()
    try:
        yield daemon
    finally:
        stop_and_sweep(daemon)


def stop_and_sweep(daemon: Daemon) -> None:
    """Stop a test daemon and remove anything it left: VMMs, VM namespaces, its host namespace."""
    daemon.stop()
    kill_leftovers(daemon.data_dir)
    if (daemon.data_dir / "metald.db").exists():
        asyncio.run(_sweep_vm_namespaces(daemon))
    for ns in _netns_with_prefix(daemon.host_netns):
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Iterator[Daemon]:
    """One shared daemon for the API tests; tests isolate themselves by customer id."""
    with serving(Daemon(tmp_path_factory.mktemp("metald"), assets_dir)) as d:
        yield d


@pytest.fixture
def customer() -> str:
    return "c" + uuid.uuid4().hex[:10]


@pytest.fixture
def rpc(daemon: Daemon, customer: str) -> Iterator[Rpc]:
    client = Rpc(daemon.url, customer)
    try:
        yield client
    finally:
        client.delete_all()
