"""A throwaway PostgreSQL cluster for tests: initdb in a temporary directory, a unix socket only
(no TCP listener), run as the `postgres` user (PostgreSQL refuses root), removed at the end."""

from __future__ import annotations

import glob
import shutil
import subprocess
import tempfile
from pathlib import Path


def pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise FileNotFoundError(f"{name}: install Debian's postgresql (scripts/setup.sh)")
    return found[-1]


class Postgres:
    def __init__(self, port: int = 5432) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="metald-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self.port = port
        self.log = self.root / "postgres.log"
        shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres(pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")

    @property
    def dsn(self) -> str:
        return f"postgresql:///postgres?host={self.socket_dir}&port={self.port}&user=postgres"

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True)

    def start(self) -> Postgres:
        options = (
            f"-c listen_addresses='' -k {self.socket_dir} -p {self.port} -c fsync=off -c max_connections=100"
        )
        self._as_postgres(
            pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-o", options, "start"
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                pg_bin("pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                mode,
                "-w",
                "stop",
            ],
            check=False,
            capture_output=True,
        )

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
