"""Start, kill and restart real `metald serve` processes for tests, each with its own port and state."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
METALD = [sys.executable, "-m", "metald.cli.daemon"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServedProcess:
    """A metald process that answers /health at `url` once up, its output in `log_path`."""

    url: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: list[str], what: str, timeout: float) -> None:
        """Start `argv` and wait until /health answers (200 or 503); RuntimeError with the log's
        tail if it exits or stays silent."""
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=REPO, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code in (200, 503):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{what} did not answer within {timeout}s:\n{self.logs()[-4000:]}")

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Daemon(ServedProcess):
    """One metald process. Stopping it leaves its VMs running, as in production."""

    def __init__(self, data_dir: Path, assets_dir: Path, *extra_args: str, name: str = "metald") -> None:
        self.data_dir = data_dir
        self.assets_dir = assets_dir
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / f"{name}.log"
        self.host_netns = f"mdt{os.getpid() % 100000}{name[-3:]}"
        self.proc = None

    def argv(self) -> list[str]:
        return [
            *METALD,
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--data-dir",
            str(self.data_dir),
            "--assets-dir",
            str(self.assets_dir),
            "--accel",
            "tcg",
            "--log-format",
            "json",
            "--network-host-netns",
            self.host_netns,
            *self.extra_args,
        ]

    def start(self, timeout: float = 30) -> Daemon:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.spawn(self.argv(), "metald", timeout)
        return self

    def restart(self, *, hard: bool = True) -> Daemon:
        self.kill9() if hard else self.stop()
        return self.start()


def vmm_pids(data_dir: Path) -> list[int]:
    """Live (non-zombie) processes of a data dir other than the daemon: naming it on their command
    line (supervisors) or working inside it (VMMs run in their VM's directory)."""
    needle = str(data_dir).encode()
    root = os.path.realpath(data_dir)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        inside = needle in cmdline or cwd == root or cwd.startswith(root + "/")
        if inside and state != "Z" and b"metald.cli.daemon" not in cmdline:
            pids.append(int(entry.name))
    return pids


def kill_leftovers(data_dir: Path) -> list[int]:
    pids = vmm_pids(data_dir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids
