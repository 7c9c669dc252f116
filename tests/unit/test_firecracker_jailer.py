"""Firecracker command lines: the jailer's flags as documented in Firecracker's docs/jailer.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from metald.backends.firecracker import launch
from metald.backends.vmm.cgroups import VMM_MEMORY_OVERHEAD, VMM_PIDS_BASE
from metald.backends.vmm.sandbox import VmmUser

MIB = 1024 * 1024

# docs/jailer.md, "Jailer Usage": flags taking a value, and the two boolean ones.
DOCUMENTED_VALUE_FLAGS = {
    "--id",
    "--exec-file",
    "--uid",
    "--gid",
    "--parent-cgroup",
    "--cgroup-version",
    "--cgroup",
    "--chroot-base-dir",
    "--netns",
    "--resource-limit",
}
DOCUMENTED_SWITCHES = {"--daemonize", "--new-pid-ns"}
REQUIRED = {"--id", "--exec-file", "--uid", "--gid"}


def jailer_flags(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(flag, value) pairs before `--`, and what follows `--` (Firecracker's own arguments)."""
    split = argv.index("--")
    pairs, rest = [], argv[1:split]
    while rest:
        flag = rest.pop(0)
        assert flag in DOCUMENTED_VALUE_FLAGS | DOCUMENTED_SWITCHES, f"undocumented jailer flag {flag}"
        pairs.append((flag, "" if flag in DOCUMENTED_SWITCHES else rest.pop(0)))
    return pairs, argv[split + 1 :]


def build(**overrides: object) -> list[str]:
    args: dict[str, object] = {
        "jailer": "/usr/bin/jailer",
        "firecracker": "/usr/bin/firecracker",
        "fc_id": "vm-01abc-1234abcd",
        "api_sock": "/fc.sock",
        "uid": 123,
        "gid": 100,
        "chroot_base": Path("/srv/jailer"),
        "netns": "ns_vm_1",
        "cgroup_version": 2,
        "vcpu_count": 2,
        "memory_bytes": 512 * MIB,
    }
    args.update(overrides)
    return launch.jailer_argv(**args)  # type: ignore[arg-type]


def test_jailer_argv_v2_is_exact() -> None:
    assert build() == [
        "/usr/bin/jailer",
        "--id", "vm-01abc-1234abcd",
        "--exec-file", "/usr/bin/firecracker",
        "--uid", "123",
        "--gid", "100",
        "--chroot-base-dir", "/srv/jailer",
        "--cgroup-version", "2",
        "--cgroup", "cpu.max=200000 100000",
        "--cgroup", f"memory.max={512 * MIB + VMM_MEMORY_OVERHEAD}",
        "--cgroup", f"pids.max={VMM_PIDS_BASE + 2}",
        "--netns", "/var/run/netns/ns_vm_1",
        "--", "--api-sock", "/fc.sock",
    ]  # fmt: skip


@pytest.mark.parametrize("version", [1, 2])
def test_only_documented_flags_and_the_supervisor_keeps_the_pid(version: int) -> None:
    pairs, firecracker_args = jailer_flags(build(cgroup_version=version))
    flags = [f for f, _ in pairs]
    assert set(flags) >= REQUIRED
    # --daemonize would detach Firecracker from its supervisor, --new-pid-ns would fork it away.
    assert not DOCUMENTED_SWITCHES & set(flags)
    # The jailer passes --id itself: Firecracker's own arguments are only the socket.
    assert firecracker_args == ["--api-sock", "/fc.sock"]
    for flag, value in pairs:
        if flag == "--cgroup":
            assert re.fullmatch(r"[a-z_]+\.[a-z_]+=.+", value), value  # <cgroup_file>=<value>
        if flag == "--cgroup-version":
            assert value == str(version)


def test_cgroup_v1_limits() -> None:
    cgroups = [v for f, v in jailer_flags(build(cgroup_version=1, vcpu_count=3))[0] if f == "--cgroup"]
    assert cgroups == [
        "cpu.cfs_period_us=100000",
        "cpu.cfs_quota_us=300000",
        f"memory.limit_in_bytes={512 * MIB + VMM_MEMORY_OVERHEAD}",
        f"pids.max={VMM_PIDS_BASE + 3}",
    ]


def test_limits_follow_the_config() -> None:
    assert launch.cgroup_limits(2, 4, 1024 * MIB) == [
        "cpu.max=400000 100000",
        f"memory.max={1024 * MIB + VMM_MEMORY_OVERHEAD}",
        f"pids.max={VMM_PIDS_BASE + 4}",
    ]
    with pytest.raises(ValueError):
        launch.cgroup_limits(3, 1, MIB)


def test_no_netns_flag_without_a_namespace() -> None:
    assert "--netns" not in build(netns=None)


def test_jail_and_cgroup_directories() -> None:
    base = Path("/srv/jailer")
    assert launch.jail_dir(base, "/opt/fc/firecracker-v1.17", "vm-1") == base / "firecracker-v1.17" / "vm-1"
    root = Path("/sys/fs/cgroup")
    assert launch.cgroup_dirs(root, 2, "/usr/bin/firecracker", "vm-1") == [root / "firecracker" / "vm-1"]
    assert launch.cgroup_dirs(root, 1, "/usr/bin/firecracker", "vm-1") == [
        root / "cpu" / "firecracker" / "vm-1",
        root / "memory" / "firecracker" / "vm-1",
        root / "pids" / "firecracker" / "vm-1",
    ]


def test_direct_argv_wraps_netns_and_credentials() -> None:
    plain = launch.direct_argv(
        firecracker="firecracker", fc_id="vm-1", api_sock="fc.sock", netns=None, user=None
    )
    assert plain == ["firecracker", "--id", "vm-1", "--api-sock", "fc.sock"]
    wrapped = launch.direct_argv(
        firecracker="firecracker", fc_id="vm-1", api_sock="fc.sock", netns="ns1", user=VmmUser(7, 8)
    )
    assert wrapped[:4] == ["ip", "netns", "exec", "ns1"]
    assert wrapped[4] == "setpriv" and "--reuid=7" in wrapped and "--regid=8" in wrapped
    assert wrapped[-5:] == plain


@pytest.mark.parametrize(
    "vm_id", ["vm_01hq3c4r5s6t7v8w9x0y1z2a3b", "a_b", "x" * 63 + "_", "_" * 64, "vm-plain-1"]
)
def test_firecracker_id_is_valid_for_firecracker_and_the_jailer(vm_id: str) -> None:
    fc_id = launch.firecracker_id(vm_id)
    assert re.fullmatch(r"[A-Za-z0-9-]{1,64}", fc_id)  # validators.rs: alphanumeric and '-', 1..64


def test_firecracker_id_keeps_valid_ids_and_never_merges_two() -> None:
    assert launch.firecracker_id("vm-plain-1") == "vm-plain-1"
    ids = {launch.firecracker_id(v) for v in ("vm_a", "vm-a", "vm_a_", "vm-a-", "vm__a")}
    assert len(ids) == 5


def test_recognises_its_firecracker_by_id() -> None:
    assert launch.is_firecracker_of(["firecracker", "--id", "vm-1", "--api-sock", "fc.sock"], "vm-1")
    assert launch.is_firecracker_of(["./firecracker", "--id=vm-1", "--start-time-us=5"], "vm-1")
    assert not launch.is_firecracker_of(["firecracker", "--id", "vm-12"], "vm-1")
    assert not launch.is_firecracker_of(["qemu-system-x86_64", "-name", "vm-1"], "vm-1")
