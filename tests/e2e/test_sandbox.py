"""Sandboxed VMMs (issue 6) on real QEMU guests: an unprivileged user under seccomp, a cgroup of its
own with the limits the VM's config implies, a TAP handed over, an OOM kill confined to the VM,
and nothing left behind (cgroups, processes, namespaces, the test's own system user).

The VM directories live under pytest's tmp_path, whose parents only root may enter: QEMU gets
every file as a descriptor and needs no path to any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from metald.backends import procfs
from metald.backends.qemu.agent import GuestAgent
from metald.backends.qemu.backend import QemuBackend
from metald.backends.vmm import cgroups as cg
from metald.backends.vmm.layout import VMM_STATE
from metald.backends.vmm.sandbox import VmmUser, resolve_vmm_user
from metald.network import plumbing
from metald.ports import DiskSpec, LaunchSpec, NicSpec
from tests.e2e.conftest import Events, wait_until
from tests.support.specs import bare_spec

MIB = 1024 * 1024
READY_TIMEOUT = 60.0
PREFIX = f"mdt-sbx-{os.getpid()}"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: users, cgroups, namespaces"),
]


@pytest.fixture(scope="module")
def vmm_user() -> Iterator[VmmUser]:
    """A system user of this test's own, resolved the way the daemon resolves `vmm_user`."""
    name = f"mdt-vmm-{os.getpid()}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True
    )
    try:
        user = resolve_vmm_user(name)
        assert user is not None and user.uid == pwd.getpwnam(name).pw_uid != 0
        yield user
    finally:
        subprocess.run(["userdel", name], check=False)


@pytest.fixture
def cgroups() -> Iterator[cg.Cgroups]:
    """The host's hierarchy, under a parent of this test's own; it must be empty at the end."""
    found = cg.Cgroups.detect(Path("/sys/fs/cgroup"), parent=PREFIX)
    if found is None:
        pytest.skip("no cgroup hierarchy with memory, cpu and pids")
    yield found
    parents = {mount / found.parent for mount in found.mounts.values()}
    leaked = [d for p in parents if p.exists() for d in p.iterdir() if d.is_dir()]
    for parent in parents:
        with contextlib.suppress(FileNotFoundError):
            parent.rmdir()
    assert leaked == [], f"cgroups leaked: {leaked}"


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    """(host namespace with a bridge, VM namespace): both this test's own, deleted at the end."""
    host, vm = f"{PREFIX}-h", f"{PREFIX}-v"
    subprocess.run(["ip", "netns", "add", host], check=True)
    try:
        subprocess.run(["ip", "-n", host, "link", "add", "mb0", "type", "bridge"], check=True)
        yield host, vm
    finally:
        for ns in (vm, host):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def launch_spec(assets: Path, vm_dir: Path, vm_id: str, **changes: object) -> LaunchSpec:
    disks = (DiskSpec("root", (assets / "rootfs.ext4").resolve(), read_only=False, is_root=True),)
    return bare_spec(
        vm_id,
        vm_dir,
        assets / "vmlinux",
        disks,
        **{"initrd": assets / "initrd", "guest_kernel_args": f"metald.vm_id={vm_id}", **changes},
    )


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def cgroup_paths(pid: int) -> dict[str, str]:
    """controller -> cgroup path of a process ("" for v2's unified line)."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            out[controller] = path
    return out


async def agent_exec(vm_dir: Path, command: str, timeout: float = 30.0) -> tuple[int, str]:
    agent = await GuestAgent.connect(vm_dir)
    try:
        assert await agent.ping(15.0), "guest agent does not answer"
        return await asyncio.wait_for(agent.exec(command), timeout)
    finally:
        await agent.close()


async def test_vmm_is_unprivileged_confined_and_leaves_nothing(
    assets_dir: Path,
    tmp_path: Path,
    vmm_user: VmmUser,
    cgroups: cg.Cgroups,
    netns: tuple[str, str],
    backends: Callable[..., QemuBackend],
) -> None:
    user = vmm_user
    host_ns, vm_ns = netns
    nic = plumbing.NicLinks(0, "tap0", f"vh{os.getpid() % 100000}", None)
    await plumbing.ensure_vm(host_ns, vm_ns, "mb0", [nic])
    vm_dir = tmp_path / "vms" / "vm-sbx"
    spec = launch_spec(
        assets_dir,
        vm_dir,
        "vm-sbx",
        vcpu_count=2,
        nics=(NicSpec("eth0", "tap0", "02:00:00:00:5b:01"),),
        netns=vm_ns,
    )
    events: Events = []
    backend = backends(events, vmm_user=user, cgroups=cgroups)
    pid = (await backend.start(spec)).pid
    assert await backend.wait_ready("vm-sbx", READY_TIMEOUT)

    # Unprivileged, no capabilities, seccomp filter mode (QEMU's -sandbox), no way to regain root.
    st = status(pid)
    assert st["Uid"].split() == [str(user.uid)] * 4 and st["Gid"].split() == [str(user.gid)] * 4
    assert st["Groups"] == "" and st["CapEff"] == st["CapPrm"] == "0000000000000000"
    assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1"

    # Its own cgroup in every controller, recorded for a later daemon, with the limits the config
    # implies: guest RAM + 256 MiB, 2 vCPUs = 200 % of a core, 128 + 2 pids.
    name = cg.cgroup_name("vm-sbx", vm_dir)
    controllers = cg.CONTROLLERS if cgroups.version == 1 else ("",)
    assert {cgroup_paths(pid)[c] for c in controllers} == {f"/{cgroups.parent}/{name}"}
    state = json.loads((vm_dir / VMM_STATE).read_text())
    assert state["cgroup"] == [str(d) for d in cgroups.dirs(name)]
    limits = {
        1: {
            ("memory", "memory.limit_in_bytes"): str(512 * MIB),
            ("cpu", "cpu.cfs_quota_us"): "200000",
            ("cpu", "cpu.cfs_period_us"): "100000",
            ("pids", "pids.max"): "130",
        },
        2: {
            ("memory", "memory.max"): str(512 * MIB),
            ("cpu", "cpu.max"): "200000 100000",
            ("pids", "pids.max"): "130",
        },
    }[cgroups.version]
    for (controller, file), value in limits.items():
        assert (cgroups.mounts[controller] / cgroups.parent / name / file).read_text().strip() == value

    # QEMU holds the TAP (carrier up) though it could not open it: the TAP is root's (no owner)
    # and so is /dev/net/tun on this kind of host; the daemon attached to it and handed it over.
    shown = await asyncio.to_thread(
        subprocess.run,
        ["ip", "-n", vm_ns, "-j", "-d", "link", "show", "tap0"],
        capture_output=True,
        check=True,
    )
    link = json.loads(shown.stdout)[0]
    assert "user" not in link["linkinfo"]["info_data"]
    assert "LOWER_UP" in link["flags"]

    # The guest writes its disk (an overlay handed over as a descriptor); the VMM owns no host file.
    assert await agent_exec(vm_dir, "echo kept > /root/f && sync && cat /root/f") == (0, "kept")
    assert [p for p in vm_dir.rglob("*") if p.lstat().st_uid == user.uid] == []
    assert vm_dir.stat().st_mode & 0o007 == 0

    # A restarted daemon adopts the VM. Its supervisor is then killed: QEMU follows (parent-death
    # signal) and the daemon removes the cgroup the supervisor no longer could.
    await backend.close()
    second = backends(events, vmm_user=user, cgroups=cgroups)
    adopted = await second.adopt(spec)
    assert adopted is not None and adopted.pid == pid
    os.kill(state["supervisor_pid"], signal.SIGKILL)
    assert await wait_until(lambda: events == [("vm-sbx", "vmm_crashed")], 10.0), events
    assert all(not d.exists() for d in cgroups.dirs(name))
    await second.destroy("vm-sbx", vm_dir)
    assert not vm_dir.exists()
    await plumbing.remove_vm(host_ns, vm_ns, [nic.host_veth])


async def test_vmm_over_its_memory_limit_is_oom_killed_alone(
    assets_dir: Path,
    tmp_path: Path,
    vmm_user: VmmUser,
    cgroups: cg.Cgroups,
    backends: Callable[..., QemuBackend],
) -> None:
    """No allowance above guest RAM: the limit holds the boot (~180 MiB charged) but not a guest that
    then uses 400 MiB of its 512 MiB, on top of QEMU's own memory."""
    events: Events = []
    backend = backends(events, vmm_user=vmm_user, cgroups=cgroups, memory_overhead=0)
    vm_dir = tmp_path / "vm-oom"
    spec = launch_spec(assets_dir, vm_dir, "vm-oom", memory_bytes=512 * MIB)
    own_memory_cgroup = cgroups.mounts["memory"] / cgroup_paths(os.getpid())[
        "memory" if cgroups.version == 1 else ""
    ].lstrip("/")
    own_ooms = cg.oom_kills([own_memory_cgroup])
    pid = (await backend.start(spec)).pid
    assert await backend.wait_ready("vm-oom", READY_TIMEOUT)

    with contextlib.suppress(OSError, TimeoutError, EOFError, ValueError):  # the agent dies with QEMU
        await agent_exec(vm_dir, "dd if=/dev/zero of=/dev/null bs=400M count=1")
    assert await wait_until(lambda: ("vm-oom", "oom_killed") in events, 30.0), events
    assert events == [("vm-oom", "oom_killed")]
    assert backend.last_exit_reason("vm-oom") == "oom_killed"
    # Only QEMU was killed: the supervisor, outside the cgroup, lived to record why (the reason comes
    # from its exit.json), and the OOM killer never acted in the cgroup of this test (the "daemon").
    stat = procfs.read_stat(pid)
    assert stat is None or stat.state == "Z"
    assert cg.oom_kills([own_memory_cgroup]) == own_ooms
    assert all(not d.exists() for d in cgroups.dirs(cg.cgroup_name("vm-oom", vm_dir)))
    await backend.destroy("vm-oom", vm_dir)
