"""Fixtures of the operations tests: extra daemons in odd conditions, metric scrapes, CLI runs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import stop_and_sweep
from tests.support.daemon import Daemon

StartDaemon = Callable[..., Daemon]


@pytest.fixture
def start_daemon(tmp_path: Path, assets_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StartDaemon]:
    """Start extra daemons: start(name, *flags, data_dir=None, env={}); all stopped at the end."""
    started: list[Daemon] = []

    def start(
        name: str, *flags: str, data_dir: Path | None = None, env: dict[str, str] | None = None
    ) -> Daemon:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)  # read once, when the process starts
        daemon = Daemon(data_dir or tmp_path / name, assets_dir, "--no-network-enabled", *flags, name=name)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        stop_and_sweep(daemon)


class QemuLink:
    """A daemon's QEMU binary as a symlink the test can take away and put back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.target = Path(shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.restore()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def restore(self) -> None:
        if not self.path.is_symlink():
            os.symlink(self.target, self.path)


@pytest.fixture
def qemu_link(tmp_path: Path) -> Iterator[QemuLink]:
    link = QemuLink(tmp_path / "bin" / "qemu-system-x86_64")
    yield link
    link.restore()
