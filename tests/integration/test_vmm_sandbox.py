"""The shared VMM machinery without a VMM: limits, cgroup hierarchies (fake trees for the versions
this host lacks), the VMM user, and the real supervisor running small commands in real cgroups."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from metald.backends.vmm import cgroups as cg
from metald.backends.vmm.process import ExitInfo, VmmProcess, exit_reason, read_exit
from metald.backends.vmm.sandbox import VmmUser, resolve_vmm_user

MIB = 1024 * 1024


def test_limits_follow_the_config() -> None:
    limits = cg.vmm_limits(2, 512 * MIB)
    assert limits == cg.VmmLimits(memory_bytes=768 * MIB, cpu_quota_us=200_000, pids=130)
    assert cg.limit_files(2, limits) == [
        ("cpu.max", "200000 100000"),
        ("memory.max", str(768 * MIB)),
        ("pids.max", "130"),
    ]
    assert cg.limit_files(1, cg.vmm_limits(1, 256 * MIB, overhead=0)) == [
        ("cpu.cfs_period_us", "100000"),
        ("cpu.cfs_quota_us", "100000"),
        ("memory.limit_in_bytes", str(256 * MIB)),
        ("pids.max", "129"),
    ]
    with pytest.raises(ValueError):
        cg.limit_files(3, limits)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)
    return root


def test_detect_prefers_v2_with_every_controller(tmp_path: Path) -> None:
    v2 = _tree(tmp_path / "v2", {"cgroup.controllers": "cpuset cpu io memory hugetlb pids\n"})
    assert cg.Cgroups.detect(v2) == cg.Cgroups(2, dict.fromkeys(cg.CONTROLLERS, v2))
    hybrid = _tree(tmp_path / "hybrid", {"unified/cgroup.controllers": "memory pids cpu\n"})
    assert cg.Cgroups.detect(hybrid, "p") == cg.Cgroups(
        2, dict.fromkeys(cg.CONTROLLERS, hybrid / "unified"), "p"
    )
    # This host's kind: an empty unified hierarchy, the controllers on v1.
    v1 = {f"{c}/cgroup.procs": "" for c in cg.CONTROLLERS} | {"unified/cgroup.controllers": "hugetlb\n"}
    v1_root = _tree(tmp_path / "v1", v1)
    assert cg.Cgroups.detect(v1_root) == cg.Cgroups(1, {c: v1_root / c for c in cg.CONTROLLERS})
    no_pids = _tree(tmp_path / "nopids", {"memory/cgroup.procs": "", "cpu/cgroup.procs": ""})
    assert cg.Cgroups.detect(no_pids) is None
    assert cg.Cgroups.detect(tmp_path / "missing") is None


def test_create_v2_enables_controllers_and_writes_limits(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"cgroup.controllers": "memory cpu pids", "m/vm-1/memory.swap.max": "max"})
    groups = cg.Cgroups(2, dict.fromkeys(cg.CONTROLLERS, root), parent="m")
    assert groups.create("vm-1", cg.vmm_limits(1, 128 * MIB)) == [root / "m" / "vm-1"]
    for level in (root, root / "m"):
        assert (level / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    leaf = root / "m" / "vm-1"
    assert (leaf / "cpu.max").read_text() == "100000 100000"
    assert (leaf / "memory.max").read_text() == str(384 * MIB)
    assert (leaf / "pids.max").read_text() == "129"
    assert (leaf / "memory.swap.max").read_text() == "0"  # no swapping past the limit


def test_oom_kills_reads_both_versions(tmp_path: Path) -> None:
    v2 = _tree(tmp_path / "a", {"memory.events": "low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\n"})
    v1 = _tree(tmp_path / "b", {"memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"})
    assert (cg.oom_kills([v2]), cg.oom_kills([tmp_path / "none", v1]), cg.oom_kills([])) == (1, 3, 0)


def test_cgroup_names_are_per_vm_directory() -> None:
    a = cg.cgroup_name("vm_1", Path("/var/lib/metald/vms/vm_1"))
    assert a.startswith("vm_1-") and a == cg.cgroup_name("vm_1", Path("/var/lib/metald/vms/vm_1"))
    assert a != cg.cgroup_name("vm_1", Path("/tmp/other/vms/vm_1"))
    assert "/" not in cg.cgroup_name("../x/y", Path("/d"))


def test_exit_reasons() -> None:
    assert exit_reason(ExitInfo(-9, oom_killed=True)) == "oom_killed"
    assert exit_reason(ExitInfo(0)) == "guest_poweroff"
    assert exit_reason(ExitInfo(0), guest_poweroff=False) == "vmm_crashed"  # QEMU: host-side quit
    assert exit_reason(ExitInfo(-9)) == exit_reason(ExitInfo(None)) == "vmm_crashed"


def test_vmm_user_resolution(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_vmm_user("", None, None) is None
    assert resolve_vmm_user("ignored", 0, None) == VmmUser(0, 0)  # explicit uid wins, its own group
    assert resolve_vmm_user("ignored", 54321, 7) == VmmUser(54321, 7)
    assert resolve_vmm_user("root") == VmmUser(0, 0)
    missing = f"no-such-user-{uuid.uuid4().hex[:8]}"
    with caplog.at_level(logging.WARNING):
        assert resolve_vmm_user(missing) is None
    assert "UNSANDBOXED" in caplog.text and missing in caplog.text


@pytest.fixture
def real_cgroups() -> Iterator[cg.Cgroups]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    found = cg.Cgroups.detect(Path("/sys/fs/cgroup"), parent=f"mdt-vmm-{os.getpid()}")
    if found is None:
        pytest.skip("no cgroup hierarchy with memory, cpu and pids")
    yield found
    for mount in found.mounts.values():
        (mount / found.parent).rmdir()  # fails (ENOTEMPTY) if a test leaked a cgroup


async def test_supervisor_runs_the_command_in_its_cgroup_with_the_given_fds(
    tmp_path: Path, real_cgroups: cg.Cgroups
) -> None:
    dirs = await asyncio.to_thread(real_cgroups.create, "fds", cg.vmm_limits(1, 64 * MIB))
    read_end, write_end = os.pipe()
    script = f"import os, time; os.write({write_end}, open('/proc/self/cgroup', 'rb').read()); time.sleep(30)"
    try:
        vmm = await VmmProcess.spawn(
            tmp_path, [sys.executable, "-c", script], pass_fds=[write_end], cgroup=dirs
        )
    finally:
        os.close(write_end)
    try:
        assert vmm.cgroup == dirs
        seen = (await asyncio.to_thread(os.read, read_end, 4096)).decode()
        assert f"/{real_cgroups.parent}/fds" in seen
        attached = await VmmProcess.attach(tmp_path, lambda argv: argv[1:] == ["-c", script])
        assert attached is not None and attached.cgroup == dirs
        attached.detach()
        assert await VmmProcess.attach(tmp_path, lambda argv: False) is None
        vmm.kill()
        assert await asyncio.wait_for(vmm.exited, 10) == ExitInfo(-9, oom_killed=False)
        assert all(not d.exists() for d in dirs)  # removed by the supervisor
    finally:
        os.close(read_end)
        vmm.kill()


async def test_supervisor_records_an_oom_kill(tmp_path: Path, real_cgroups: cg.Cgroups) -> None:
    dirs = await asyncio.to_thread(real_cgroups.create, "oom", cg.vmm_limits(1, 16 * MIB, overhead=0))
    # It allocates once its supervisor has recorded it (vmm.json, in its cwd): the launcher starts it
    # alongside the supervisor's Python, and a VMM gone before that record is a failed start.
    wait = "import os, time\nwhile not os.path.exists('vmm.json'): time.sleep(0.005)\n"
    hog = [sys.executable, "-c", wait + "x = bytearray(256 << 20)"]
    vmm = await VmmProcess.spawn(tmp_path, hog, cgroup=dirs)
    assert await asyncio.wait_for(vmm.exited, 30) == ExitInfo(-9, oom_killed=True)
    assert read_exit(tmp_path) == ExitInfo(-9, oom_killed=True)
    assert all(not d.exists() for d in dirs)


async def test_stale_cgroups_are_removed_but_not_live_or_new_ones(
    tmp_path: Path, real_cgroups: cg.Cgroups
) -> None:
    """What a killed supervisor leaves (an empty cgroup) goes at the next start-up; a cgroup with a
    process cannot go, and a fresh one may be a VMM's about to start."""
    stale = await asyncio.to_thread(real_cgroups.create, "stale", cg.vmm_limits(1, 64 * MIB))
    live = await asyncio.to_thread(real_cgroups.create, "live", cg.vmm_limits(1, 64 * MIB))
    vmm = await VmmProcess.spawn(tmp_path, ["sleep", "30"], cgroup=live)
    try:
        assert await asyncio.to_thread(real_cgroups.remove_stale) == []  # both are new
        removed = await asyncio.to_thread(real_cgroups.remove_stale, 0.0)
        assert sorted(removed) == sorted(stale) and all(d.exists() for d in live)
    finally:
        vmm.kill()
        await asyncio.wait_for(vmm.exited, 10)
    assert all(not d.exists() for d in live)
