"""What one test daemon holds on the host, read from /proc, `ip` and its data dir.

Other engineers' daemons run on this machine at the same time, so nothing here looks at the host
as a whole: processes are those naming the daemon's data dir, namespaces those marked as made for
the daemon's host namespace (or named after VM ids the test knows), links those inside them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from metald.network import names, plumbing
from tests.support.daemon import Daemon, vmm_pids

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _ip_json(*argv: str) -> list[dict[str, Any]]:
    done = subprocess.run(["ip", "-j", *argv], capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        return []
    data = json.loads(done.stdout)
    return data if isinstance(data, list) else []


def netns_names() -> set[str]:
    return {str(entry["name"]) for entry in _ip_json("netns", "list")}


def links(netns: str) -> set[str]:
    """Interface names in a namespace ("" = the root namespace); empty if it does not exist."""
    argv = ("-n", netns, "link", "show") if netns else ("link", "show")
    return {str(link["ifname"]) for link in _ip_json(*argv)}


def daemon_namespaces(host_netns: str, vm_ids: Iterable[str] = ()) -> set[str]:
    """VM namespaces of this daemon: those carrying its marker, plus any named after vm_ids."""
    wanted = plumbing.marker(host_netns)
    expected = {names.vm_netns(vm_id) for vm_id in vm_ids}
    found = set()
    for netns in netns_names():
        if netns in expected:
            found.add(netns)
        elif names.netns_id8(netns) is not None:
            lo = _ip_json("-n", netns, "link", "show", "lo")
            if any(link.get("ifalias") == wanted for link in lo):
                found.add(netns)
    return found


def remove_namespaces(namespaces: Iterable[str]) -> None:
    for netns in namespaces:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def data_dir_pids(data_dir: Path) -> set[int]:
    """Live processes of data_dir (VMMs and supervisors), not the daemon itself."""
    return set(vmm_pids(data_dir))


def qemu_pids(data_dir: Path) -> set[int]:
    """Live QEMU processes of this data dir (not their supervisors)."""
    return {
        p for p in data_dir_pids(data_dir) if (argv := _cmdline(p)) and "qemu-system" in Path(argv[0]).name
    }


def supervisor_pids(data_dir: Path) -> set[int]:
    """Live per-VM supervisors (`python -m metald.backends.<...>.supervisor`) of this data dir."""
    return {
        p
        for p in data_dir_pids(data_dir)
        if any(a.startswith("metald.backends.") and a.endswith(".supervisor") for a in _cmdline(p))
    }


def kill_processes(data_dir: Path) -> None:
    """SIGKILL whatever still runs in data_dir (teardown)."""
    for pid in data_dir_pids(data_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _stat_fields(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def zombie_children(pid: int) -> set[int]:
    """Children of pid that are zombies (exited, never reaped)."""
    zombies = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (f := _stat_fields(int(entry.name))) and f[0] == "Z" and f[1] == str(pid):
            zombies.add(int(entry.name))
    return zombies


def fd_kinds(pid: int, relative_to: Path | None = None) -> Counter[str]:
    """The open fds of a process by kind: socket, pipe, anon_inode:[pidfd], ... or the file's path
    (shown relative to `relative_to` when under it)."""
    kinds: Counter[str] = Counter()
    prefix = f"{relative_to}/" if relative_to else None
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            kind = target.split(":", 1)[0] if target.startswith(("socket:", "pipe:")) else target
            if prefix and kind.startswith(prefix):
                kind = kind.removeprefix(prefix)
            kinds[kind] += 1
    return kinds


def steady_fd_kinds(
    pid: int, relative_to: Path | None = None, quiet: float = 1.0, timeout: float = 15.0
) -> Counter[str]:
    """fd_kinds once unchanged for `quiet` seconds (closed connections take a moment to go)."""
    deadline = time.monotonic() + timeout
    last, since = fd_kinds(pid, relative_to), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.1)
        now = fd_kinds(pid, relative_to)
        if now != last:
            last, since = now, time.monotonic()
    return last


def fd_growth(before: Counter[str], after: Counter[str]) -> Counter[str]:
    """Kinds of fds the process holds more of than before. (Fewer sockets is fine: a client
    connection of before may have been closed since.)"""
    return after - before


def status_value(pid: int, key: str) -> int:
    """A number from /proc/PID/status (VmRSS in KiB, Threads, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_bytes(pid: int) -> int:
    return status_value(pid, "VmRSS") * 1024


def cgroups_of(vm_ids: Iterable[str], vms_dir: Path) -> set[str]:
    """cgroup directories of these VMs: named `<vm_id>-<hash of its VM dir>` by the VMM backends
    (metald.backends.vmm.cgroups.cgroup_name), or plainly after the VM where that is not in use."""
    try:
        from metald.backends.vmm.cgroups import cgroup_name
    except ImportError:  # a tree without per-VM cgroups

        def cgroup_name(vm_id: str, vm_dir: Path) -> str:
            return vm_id

    wanted = {cgroup_name(vm_id, vms_dir / vm_id) for vm_id in vm_ids if vm_id}
    found: set[str] = set()
    if not wanted or not CGROUP_ROOT.is_dir():
        return found
    for root, dirs, _ in os.walk(CGROUP_ROOT):
        found.update(os.path.join(root, d) for d in dirs if d in wanted)
    return found


def remove_cgroups(paths: Iterable[str], timeout: float = 3.0) -> None:
    """rmdir each, waiting for killed processes to leave them."""
    deadline = time.monotonic() + timeout
    for path in sorted(paths, key=len, reverse=True):
        while True:
            try:
                os.rmdir(path)
                break
            except OSError:
                if not os.path.isdir(path) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)


@dataclass(frozen=True)
class Footprint:
    """Everything the daemon's VMs hold on the host. Compare two with `changes()`."""

    qemus: frozenset[int]
    supervisors: frozenset[int]
    zombies: frozenset[int]
    vm_dirs: frozenset[str]
    sockets: frozenset[str]
    namespaces: frozenset[str]
    taps: frozenset[str]
    host_links: frozenset[str]
    root_links: frozenset[str]
    cgroups: frozenset[str]

    @classmethod
    def of(cls, daemon: Daemon, vm_ids: Iterable[str] = ()) -> Footprint:
        ids = set(vm_ids)
        vms_dir = daemon.data_dir / "vms"
        namespaces = daemon_namespaces(daemon.host_netns, ids)
        ours = {names.id8(vm_id) for vm_id in ids}
        return cls(
            qemus=frozenset(qemu_pids(daemon.data_dir)),
            supervisors=frozenset(supervisor_pids(daemon.data_dir)),
            zombies=frozenset(zombie_children(daemon.proc.pid) if daemon.proc else ()),
            vm_dirs=frozenset(p.name for p in vms_dir.iterdir()) if vms_dir.is_dir() else frozenset(),
            sockets=frozenset(
                str(p.relative_to(daemon.data_dir)) for p in daemon.data_dir.rglob("*") if p.is_socket()
            ),
            namespaces=frozenset(namespaces),
            taps=frozenset(
                f"{ns}/{link}" for ns in namespaces for link in links(ns) if link.startswith("tap")
            ),
            host_links=frozenset(links(daemon.host_netns))
            if daemon.host_netns in netns_names()
            else frozenset(),
            # devices named after the test's VMs must never appear in the root namespace
            root_links=frozenset(link for link in links("") if any(i in link for i in ours)),
            cgroups=frozenset(cgroups_of(ids, vms_dir)),
        )

    def changes(self, other: Footprint) -> dict[str, tuple[set[Any], set[Any]]]:
        """{field: (added in other, removed in other)} for every field that differs."""
        out = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out[f.name] = (set(theirs - mine), set(mine - theirs))
        return out


def db_rows(data_dir: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the daemon's SQLite file directly (read-only), for what the API does not show."""
    uri = f"file:{data_dir / 'metald.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        return db.execute(sql, params).fetchall()


def metric(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """A sample's value from Prometheus text (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return 0.0
