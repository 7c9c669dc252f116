"""End to end: build the guest image, boot it under QEMU microvm (TCG) and drive the guest contract.

Set METALD_TEST_ASSETS to build into (and reuse) a fixed directory instead of a temporary one, and
METALD_TEST_GUEST_CACHE to keep the downloaded .debs elsewhere than var/cache (shared with conftest).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from metald.assets import AssetResolver
from metald.backends.qemu.layout import overlay_path
from metald.backends.qemu.overlay import prepare_vm_dir, recorded_bases
from metald.guest import GuestImage, build_guest_image, builder
from metald.ports import DiskSpec
from tests.support.specs import bare_spec

QEMU = "qemu-system-x86_64"
MACHINE = "microvm,acpi=on,x-option-roms=off,isa-serial=on,rtc=on,pit=on,pic=on,pcie=off"
READY_TIMEOUT = 60.0

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} not installed"),
]


def _cache_dir() -> Path:
    repo = Path(__file__).resolve().parents[2]
    return Path(os.environ.get("METALD_TEST_GUEST_CACHE") or repo / "var" / "cache")


def _tsc_khz() -> int:
    """Host TSC rate: under TCG the guest needs tsc_early_khz or it sometimes hangs in early boot."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    raise RuntimeError("no 'cpu MHz' in /proc/cpuinfo")


async def _superblock(image: Path) -> dict[str, str]:
    """The ext4 superblock fields `dumpe2fs -h` prints."""
    proc = await asyncio.create_subprocess_exec(
        "dumpe2fs", "-h", str(image), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await proc.communicate()
    lines = (line.partition(":") for line in out.decode().splitlines())
    return {key: value.strip() for key, sep, value in lines if sep}


@pytest.fixture(scope="session")
async def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestImage:
    assets = os.environ.get("METALD_TEST_ASSETS")
    return await build_guest_image(
        Path(assets) if assets else tmp_path_factory.mktemp("assets"), _cache_dir()
    )


class Agent:
    """Host side of the guest agent's line protocol (virtio-serial port org.metald.agent)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, line: str) -> None:
        self.writer.write(line.encode() + b"\n")
        await self.writer.drain()

    async def readline(self, timeout: float = 20.0) -> str:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise ConnectionError("agent socket closed")
        return line.decode().rstrip("\r\n")

    async def exec(self, command: str, timeout: float = 20.0) -> tuple[list[str], int]:
        await self.send(f"exec {command}")
        lines: list[str] = []
        while not (line := await self.readline(timeout)).startswith("EXIT "):
            lines.append(line)
        return lines, int(line.split()[1])


class Vm:
    """One QEMU process and its serial log, QMP socket and agent socket."""

    def __init__(self, proc: asyncio.subprocess.Process, workdir: Path) -> None:
        self.proc = proc
        self.workdir = workdir
        self.serial = workdir / "serial.log"

    def ready_lines(self) -> list[dict[str, str]]:
        text = self.serial.read_text(errors="replace") if self.serial.exists() else ""
        return [
            {key: value for key, _, value in (token.partition("=") for token in line.split()[1:])}
            for line in text.splitlines()
            if line.startswith("METALD_READY ")
        ]

    async def wait_ready(self, count: int = 1, timeout: float = READY_TIMEOUT) -> dict[str, str]:
        """Wait for the count-th METALD_READY line; return its fields."""
        deadline = time.monotonic() + timeout
        while len(ready := self.ready_lines()) < count:
            if self.proc.returncode is not None:
                raise AssertionError(f"QEMU exited ({self.proc.returncode}): {self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no METALD_READY #{count} within {timeout}s: {self.log_tail()}")
            await asyncio.sleep(0.05)
        return ready[count - 1]

    def log_tail(self) -> str:
        logs = (self.serial, self.workdir / "qemu.log")
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())

    async def agent(self) -> Agent:
        reader, writer = await asyncio.open_unix_connection(str(self.workdir / "agent.sock"))
        agent = Agent(reader, writer)
        # The guest agent polls once a second while no host client is connected.
        await agent.send("ping hello")
        assert await agent.readline() == "pong hello"
        return agent

    async def qmp(self, command: str, arguments: dict[str, object] | None = None) -> object:
        reader, writer = await asyncio.open_unix_connection(str(self.workdir / "qmp.sock"))
        try:
            await reader.readline()  # greeting
            for cmd, args in (("qmp_capabilities", {}), (command, arguments or {})):
                writer.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
                while "return" not in (reply := json.loads(await reader.readline())):
                    assert "error" not in reply, reply
            return reply["return"]
        finally:
            writer.close()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


Boot = Callable[..., Awaitable[Vm]]


@pytest.fixture
async def boot(guest: GuestImage) -> AsyncIterator[Boot]:
    """Factory that starts microVMs from the guest image; every one is killed at teardown."""
    vms: list[Vm] = []
    workdirs: list[Path] = []

    async def start(
        vm_id: str,
        *,
        cmdline: str = "",
        args: tuple[str, ...] = (),
        netns: str | None = None,
        root: Path | None = None,
    ) -> Vm:
        """Boot vm_id; root: a private writable copy of the rootfs (default: the shared one, ro)."""
        workdir = Path(tempfile.mkdtemp(prefix="metald-guest-"))  # short: unix socket paths
        workdirs.append(workdir)
        append = (
            f"console=ttyS0 reboot=t panic=-1 pci=off quiet root=/dev/vda {'rw' if root else 'ro'} "
            f"tsc_early_khz={_tsc_khz()} metald.vm_id={vm_id} {cmdline}"
        )
        root_drive = f"file={root},format=raw" if root else f"file={guest.rootfs},format=raw,read-only=on"
        argv = [
            *(("ip", "netns", "exec", netns) if netns else ()),
            QEMU, "-accel", "tcg", "-M", MACHINE, "-m", "256", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
            "-kernel", str(guest.vmlinux), "-initrd", str(guest.initrd), "-append", append,
            "-drive", f"id=root,{root_drive},if=none",
            "-device", "virtio-blk-device,drive=root",
            "-chardev", f"file,id=con0,path={workdir}/serial.log", "-serial", "chardev:con0",
            "-qmp", f"unix:{workdir}/qmp.sock,server=on,wait=off",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=agent,path={workdir}/agent.sock,server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=org.metald.agent",
            *args,
        ]  # fmt: skip
        with (workdir / "qemu.log").open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
            )
        vm = Vm(proc, workdir)
        vms.append(vm)
        return vm

    try:
        yield start
    finally:
        for vm in vms:
            await vm.kill()
        for workdir in workdirs:
            shutil.rmtree(workdir, ignore_errors=True)


async def test_second_build_is_a_fast_noop(guest: GuestImage) -> None:
    start = time.monotonic()
    again = await build_guest_image(guest.vmlinux.parent, _cache_dir())
    assert not again.rebuilt
    assert time.monotonic() - start < 5
    manifest = json.loads(guest.manifest.read_text())
    assert manifest["kernel_version"] == guest.kernel_version
    assert guest.vmlinux.read_bytes()[:4] == b"\x7fELF"
    assert guest.initrd.read_bytes()[:2] == b"\x1f\x8b"
    for image, label, size in ((guest.rootfs, "vmroot", 64), (guest.data_disk, "data", 16)):
        assert image.stat().st_size == size << 20
        assert (await _superblock(image))["Filesystem volume name"] == label


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


async def _qemu_img_compare(a: Path, b: Path) -> int:
    """0 if the two images read the same (qcow2 through its backing chain), 1 if they differ."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "compare", "-q", str(a), str(b), stdout=asyncio.subprocess.DEVNULL
    )
    return await proc.wait()


async def test_rebuild_never_changes_the_base_of_an_existing_overlay(
    guest: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VM made before `metald image build --force` with a changed input keeps reading the root
    file system it was made over; VMs made after it get the new one."""
    assets = tmp_path / "assets"
    shutil.copytree(guest.vmlinux.parent, assets, symlinks=True)  # its versions and links
    resolver = AssetResolver(assets)
    old_base = await resolver.resolve("/assets/rootfs.ext4", "rootfs")
    assert old_base.name == os.readlink(assets / "rootfs.ext4") != "rootfs.ext4"
    old_digest = _digest(old_base)
    vm_dir = tmp_path / "vm"
    disks = (DiskSpec("root", old_base, read_only=False, is_root=True),)
    spec = bare_spec("vm-old", vm_dir, guest.vmlinux, disks, initrd=guest.initrd)
    await prepare_vm_dir(spec, qemu_img="qemu-img")
    overlay = overlay_path(vm_dir, 0)

    files = builder.guest_files()
    monkeypatch.setattr(builder, "guest_files", lambda: {**files, "rootfs/etc/rebuilt": b"yes\n"})
    assert (await build_guest_image(assets, _cache_dir(), force=True)).rebuilt

    new_base = await resolver.resolve("/assets/rootfs.ext4", "rootfs")
    assert new_base != old_base and _digest(old_base) == old_digest
    assert recorded_bases(vm_dir) == {overlay.name: str(old_base)}  # what QEMU is given as base
    assert await _qemu_img_compare(overlay, old_base) == 0
    assert await _qemu_img_compare(overlay, new_base) == 1


async def test_boot_ready_and_agent_exec(boot: Boot, tmp_path: Path, guest: GuestImage) -> None:
    data = tmp_path / "data.ext4"
    shutil.copyfile(guest.data_disk, data)
    vm = await boot(
        "vm-exec",
        args=(
            "-drive", f"id=data,file={data},format=raw,if=none",
            "-device", "virtio-blk-device,drive=data",
            "-chardev", f"file,id=hvc,path={tmp_path}/hvc0.log",
            "-device", "virtconsole,chardev=hvc",
        ),
    )  # fmt: skip
    ready = await vm.wait_ready()
    assert ready["vm_id"] == "vm-exec"
    assert ready["boot_id"] and float(ready["uptime"]) > 0
    assert vm.serial.read_text().count("METALD_READY") == 1
    expected = f"METALD_READY vm_id=vm-exec boot_id={ready['boot_id']} "
    for _ in range(100):  # the guest writes hvc0 just after ttyS0
        if expected in (tmp_path / "hvc0.log").read_text():
            break
        await asyncio.sleep(0.1)
    assert expected in (tmp_path / "hvc0.log").read_text()
    agent = await vm.agent()
    assert await agent.exec("echo hi") == (["hi"], 0)
    assert await agent.exec("echo out; echo err >&2; exit 3") == (["out", "err"], 3)
    assert await agent.exec("printf no-newline") == (["no-newline"], 0)
    assert await agent.exec("hostname") == (["vm-exec"], 0)
    await agent.send("bogus")
    assert (await agent.readline()).startswith("ERR")
    # The extra disk: an empty ext4 labelled "data", writable from the guest.
    cmd = "mount /dev/vdb /data && echo ok > /data/f && cat /data/f && umount /data"
    assert await agent.exec(cmd) == (["ok"], 0)


async def test_acpi_powerdown_powers_off_cleanly(boot: Boot, tmp_path: Path, guest: GuestImage) -> None:
    root = tmp_path / "root.ext4"
    shutil.copyfile(guest.rootfs, root)
    vm = await boot("vm-powerdown", root=root)
    await vm.wait_ready()
    agent = await vm.agent()
    assert await agent.exec("echo persisted > /root/f && grep -c ' / ext4 rw' /proc/mounts") == (["1"], 0)
    await vm.qmp("system_powerdown")
    assert await asyncio.wait_for(vm.proc.wait(), 30) == 0
    assert "METALD_POWEROFF" in vm.serial.read_text()
    # rc.shutdown remounted the root read-only: the journal holds nothing to replay.
    assert "needs_recovery" not in (await _superblock(root))["Filesystem features"]


async def test_agent_reboot_and_ctrl_alt_del_boot_again(boot: Boot) -> None:
    vm = await boot("vm-reboot", args=("-device", "i8042"))
    first = await vm.wait_ready()
    agent = await vm.agent()
    await agent.send("reboot")
    assert await agent.readline() == "ok"
    second = await vm.wait_ready(count=2)
    assert second["vm_id"] == "vm-reboot"
    assert second["boot_id"] != first["boot_id"]
    assert await agent.exec("echo back") == (["back"], 0)
    # inittab: ::ctrlaltdel: reboots too
    keys = [{"type": "qcode", "data": key} for key in ("ctrl", "alt", "delete")]
    await vm.qmp("send-key", {"keys": keys})
    assert (await vm.wait_ready(count=3))["boot_id"] not in (first["boot_id"], second["boot_id"])
    assert vm.proc.returncode is None


@pytest.fixture
def netns() -> Iterator[str]:
    """A private network namespace with tap0 (10.213.0.1/24, fd00:213::1/64) and tap1
    (10.214.0.1/24); deleted after the test. Nothing in it routes anywhere."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for a network namespace")
    name = f"metald-guest-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (
            "tuntap add dev tap0 mode tap",
            "addr add 10.213.0.1/24 dev tap0",
            "addr add fd00:213::1/64 dev tap0 nodad",
            "link set tap0 up",
            "tuntap add dev tap1 mode tap",
            "addr add 10.214.0.1/24 dev tap1",
            "link set tap1 up",
        ):
            subprocess.run(["ip", "-n", name, *cmd.split()], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


async def test_nics_from_kernel_cmdline(boot: Boot, netns: str) -> None:
    mac0, mac1 = "52:54:00:AB:CD:01", "52:54:00:ab:cd:02"  # MACs match case-insensitively
    vm = await boot(
        "vm-net",
        cmdline=(
            f"metald.nic={mac0},10.213.0.2/24,10.213.0.1,fd00:213::2/64,fd00:213::1 "
            f"metald.nic={mac1},10.214.0.2/24,,,"
        ),
        args=(
            "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device", f"virtio-net-device,netdev=n0,mac={mac0}",
            "-netdev", "tap,id=n1,ifname=tap1,script=no,downscript=no",
            "-device", f"virtio-net-device,netdev=n1,mac={mac1}",
        ),
        netns=netns,
    )  # fmt: skip
    await vm.wait_ready()
    agent = await vm.agent()
    routes, rc = await agent.exec("ip route; ip -6 route")
    assert rc == 0
    dev0 = next(r.split()[2] for r in routes if r.startswith("10.213.0.0/24 dev"))
    assert any(r.startswith(f"default via 10.213.0.1 dev {dev0}") for r in routes), routes
    assert any(r.startswith(f"default via fd00:213::1 dev {dev0}") for r in routes), routes
    assert sum(r.startswith("default") for r in routes) == 2, routes
    for cmd in (
        "ping -c 1 -W 5 127.0.0.1",
        "ping -c 1 -W 5 10.213.0.1",
        "ping6 -c 1 -W 5 fd00:213::1",
        "ping -c 1 -W 5 10.214.0.1",
    ):
        assert (await agent.exec(cmd))[1] == 0, cmd
