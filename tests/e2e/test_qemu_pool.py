"""QemuBackend warm pool slots on real guests (TCG): a clone boots into the QEMU that waited for it,
is the snapshot's machine in its own directory, and slots stopped (also by another "daemon",
after a kill -9) leave no process or file; a slot's TAP, held in a namespace of its own, carries
the clone's traffic once moved into the clone's namespace."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path

from metald.backends import procfs
from metald.backends.qemu.agent import GuestAgent
from metald.backends.qemu.backend import QemuBackend
from metald.network import ip, names, plumbing
from metald.ports import LaunchSpec, NicSpec
from tests.e2e.conftest import tcg_backend
from tests.e2e.test_qemu_backend import READY_TIMEOUT, _agent_exec, launch_spec
from tests.e2e.test_qemu_snapshot import (
    backend,  # noqa: F401  (the fixture)
    snapshotted_source,
)
from tests.e2e.test_qemu_snapshot import pytestmark as snapshot_marks

pytestmark = snapshot_marks


def _slot_spec(assets: Path, slot_dir: Path, snap: Path) -> LaunchSpec:
    return dataclasses.replace(launch_spec(assets, slot_dir, slot_dir.name), restore_from=snap)


def _vmm_pid(directory: Path) -> int:
    return int(json.loads((directory / "vmm.json").read_text())["pid"])


def _alive(pid: int) -> bool:
    return procfs.read_stat(pid) is not None


async def test_a_clone_boots_into_a_waiting_slot(
    assets_dir: Path,
    tmp_path: Path,
    backend: QemuBackend,  # noqa: F811
) -> None:
    assert backend.capabilities.supports_warm_pool
    _, snap, _ = await snapshotted_source(backend, assets_dir, tmp_path)
    await backend.stop("vm-src", graceful=False, timeout=0)

    pool = tmp_path / "pool" / "snap-1"
    pool.mkdir(parents=True)
    slots = [pool / "pool_a", pool / "pool_b"]
    for slot_dir in slots:
        await backend.start_pool_slot(_slot_spec(assets_dir, slot_dir, snap))
        assert backend.pool_slot_running(slot_dir)
    waiting_pid = _vmm_pid(slots[0])

    # The clone (its directory made at create, as the service does) takes slot a.
    clone = dataclasses.replace(
        launch_spec(assets_dir, tmp_path / "vms" / "vm-clone", "vm-clone"),
        restore_from=snap,
        pool_slot=slots[0],
    )
    await backend.prepare(clone)
    runtime = await backend.start(clone)
    assert runtime.pid == waiting_pid and runtime.extra["warm_pool_slot"] == "pool_a"
    assert not slots[0].exists() and not backend.pool_slot_running(slots[0])
    assert await backend.wait_ready("vm-clone", READY_TIMEOUT)
    assert await _agent_exec(clone.vm_dir, "cat /root/unsynced") == (0, "unsynced")
    tracked = await backend.runtime("vm-clone")  # tracked as the VM's own, after the slot's watch ended
    assert tracked is not None and tracked.pid == waiting_pid and tracked.guest_ready
    assert _vmm_pid(clone.vm_dir) == waiting_pid
    assert procfs.read_cwd(waiting_pid) == str(clone.vm_dir)  # the slot's directory became the clone's
    # It writes on its own overlay, over the snapshot's frozen one.
    assert json.loads((clone.vm_dir / "disks.json").read_text())["disk0.qcow2"][0] == str(
        snap / "disk0.qcow2"
    )
    assert await _agent_exec(clone.vm_dir, "echo mine > /root/mine; sync") == (0, "")

    # Another daemon (this one killed -9) re-adopts the clone by its slot's QEMU name and stops
    # the slot it never knew of.
    other = tcg_backend(tmp_path / "state2", ram_dir=Path("/dev/shm") / f"metald-test-{os.getpid()}-other")
    try:
        spare_pid = _vmm_pid(slots[1])
        await other.stop_pool_slot(slots[1])
        assert not slots[1].exists() and not _alive(spare_pid)
        await backend._vms.close()  # the first "daemon" lets go of its VMs, as a killed one does
        adopted = await other.adopt(dataclasses.replace(clone, restore_from=None, pool_slot=None))
        assert adopted is not None and adopted.pid == waiting_pid and adopted.guest_ready
        assert adopted.extra["warm_pool_slot"] == "pool_a"
        # A reset would boot the slot's kernel command line: the guest's own reboot moves it to a
        # QEMU of its own instead.
        agent = await GuestAgent.connect(clone.vm_dir)
        try:
            assert await agent.ping(15.0) and await agent.command("reboot") == "ok"
        finally:
            await agent.close()
        for _ in range(200):
            rebooted = await other.runtime("vm-clone")
            if rebooted is not None and rebooted.pid != waiting_pid:
                break
            await asyncio.sleep(0.1)
        assert rebooted is not None and rebooted.pid != waiting_pid and "warm_pool_slot" not in rebooted.extra
        assert not _alive(waiting_pid)
        assert await other.wait_ready("vm-clone", READY_TIMEOUT)  # its own ready line, its own vm_id
        assert await _agent_exec(clone.vm_dir, "cat /root/mine") == (0, "mine")
        _, cmdline = await _agent_exec(clone.vm_dir, "cat /proc/cmdline")
        assert "metald.vm_id=vm-clone" in cmdline
        pid = rebooted.pid
        await other.destroy("vm-clone", clone.vm_dir)
        assert not _alive(pid) and not clone.vm_dir.exists()
    finally:
        await other.close()
    assert list(pool.iterdir()) == []


async def test_a_slot_gone_makes_the_clone_restore_normally(
    assets_dir: Path,
    tmp_path: Path,
    backend: QemuBackend,  # noqa: F811
) -> None:
    _, snap, _ = await snapshotted_source(backend, assets_dir, tmp_path)
    slot_dir = tmp_path / "pool" / "snap-1" / "pool_c"
    await backend.start_pool_slot(_slot_spec(assets_dir, slot_dir, snap))
    pid = _vmm_pid(slot_dir)
    os.kill(pid, 9)  # the slot's QEMU dies while waiting: the backend cleans it up
    for _ in range(100):
        if not slot_dir.exists():
            break
        await asyncio.sleep(0.05)
    assert not slot_dir.exists() and not backend.pool_slot_running(slot_dir)
    clone = dataclasses.replace(
        launch_spec(assets_dir, tmp_path / "vms" / "vm-c", "vm-c"), restore_from=snap, pool_slot=slot_dir
    )
    runtime = await backend.start(clone)
    assert "warm_pool_slot" not in runtime.extra and runtime.pid != pid
    assert await backend.wait_ready("vm-c", READY_TIMEOUT)
    for vm_id in ("vm-src", "vm-c"):
        await backend.stop(vm_id, graceful=False, timeout=0)


async def _ip(*args: str) -> str:
    return await ip.check("ip", *args)


def _netns_inode(netns: str) -> int:
    return os.stat(f"/run/netns/{netns}").st_ino


async def test_a_slot_with_a_held_tap_serves_a_clone_once_its_holder_is_the_clones_namespace(
    assets_dir: Path,
    tmp_path: Path,
    backend: QemuBackend,  # noqa: F811
) -> None:
    """The TAP a slot's QEMU opened in its holder namespace carries the clone's traffic once that
    namespace is the clone's (its TAP renamed); the holder's name then goes, and nothing is left. Traffic stays
    inside the namespace this test made (the TAP's own address)."""
    tag = f"npt{os.getpid() % 100000}"
    src_ns, vm_ns, holder = f"{tag}s", f"{tag}v", names.holder_netns(f"pool_{tag}")
    try:
        await _ip("netns", "add", src_ns)
        await _ip("-n", src_ns, "tuntap", "add", "dev", "tap0", "mode", "tap")
        source = dataclasses.replace(
            launch_spec(assets_dir, tmp_path / "src", "vm-src"),
            nics=(NicSpec("eth0", "tap0", "02:00:00:aa:00:01"),),
            netns=src_ns,
        )
        await backend.start(source)
        assert await backend.wait_ready("vm-src", READY_TIMEOUT)
        snap = tmp_path / "snapshots" / "snap-1"
        snap.parent.mkdir()
        await backend.snapshot("vm-src", snap)
        await backend.stop("vm-src", graceful=False, timeout=0)

        await plumbing.ensure_holder(tag, holder, ["held0"])
        slot_dir = tmp_path / "pool" / "snap-1" / f"pool_{tag}"
        slot = dataclasses.replace(
            _slot_spec(assets_dir, slot_dir, snap),
            nics=(NicSpec("held0", "held0", "02:00:00:aa:00:02"),),
            netns=holder,
        )
        await backend.start_pool_slot(slot)
        waiting_pid = _vmm_pid(slot_dir)
        [held] = [
            link for link in json.loads(await _ip("-n", holder, "-j", "addr")) if link["ifname"] != "lo"
        ]
        assert held["ifname"] == "held0" and "UP" not in held["flags"] and held["addr_info"] == []

        assert await plumbing.adopt_holder(holder, vm_ns, [("held0", "tap_clone")])
        await _ip("-n", vm_ns, "addr", "add", "10.254.0.1/24", "dev", "tap_clone")
        await _ip("-n", vm_ns, "link", "set", "tap_clone", "up")
        clone = dataclasses.replace(
            launch_spec(assets_dir, tmp_path / "vms" / "vm-clone", "vm-clone"),
            restore_from=snap,
            pool_slot=slot_dir,
            nics=(NicSpec("eth0", "tap_clone", "02:00:00:aa:00:03"),),
            netns=vm_ns,
        )
        await backend.prepare(clone)
        runtime = await backend.start(clone)
        assert runtime.pid == waiting_pid and runtime.extra["warm_pool_slot"] == slot_dir.name
        # The holder became the clone's namespace: QEMU runs in it, its TAP renamed.
        assert os.stat(f"/proc/{waiting_pid}/ns/net").st_ino == _netns_inode(vm_ns) == _netns_inode(holder)
        await plumbing.remove_vm(tag, holder, ())  # the holder's name goes, the clone's stays
        assert holder not in await _ip("netns", "list")
        links = [link["ifname"] for link in json.loads(await _ip("-n", vm_ns, "-j", "link"))]
        assert links == ["lo", "tap_clone"]
        setup = "ip addr flush dev eth0; ip addr add 10.254.0.2/24 dev eth0; ip link set eth0 up"
        assert (await _agent_exec(clone.vm_dir, setup))[0] == 0
        assert (await _agent_exec(clone.vm_dir, "ping -c 1 -W 5 10.254.0.1"))[0] == 0
        await backend.destroy("vm-clone", clone.vm_dir)
        assert not _alive(waiting_pid)
    finally:
        for netns in (src_ns, vm_ns, holder):
            await ip.run("ip", "netns", "del", netns)
    listed = await _ip("netns", "list")
    assert not any(ns in listed for ns in (src_ns, vm_ns, holder))
