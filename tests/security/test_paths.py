"""Host paths are not the customer's to choose: every way out of /assets/ and the VM's own
directory is refused with INVALID_ARGUMENT (PERMISSION_DENIED for metald's own state), and a refused
request leaves nothing behind: no VM record, no VM directory, no process."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import serving
from tests.support.daemon import Daemon, vmm_pids
from tests.support.rpc import Rpc

KERNEL = "config.boot.kernel_path"
INITRD = "config.boot.initrd_path"
DISK = "config.storage[0].path_on_host"
CONSOLE = "config.console.output_file"


def boot(kernel: str = "/assets/vmlinux", initrd: str = "/assets/initrd") -> dict[str, Any]:
    return {"kernel_path": kernel, "initrd_path": initrd}


def disk(path: str, *, read_only: bool = False) -> list[dict[str, Any]]:
    return [{"device_id": "root", "path_on_host": path, "is_root_device": True, "is_read_only": read_only}]


@pytest.fixture
def rpc(own_daemon: Daemon) -> Iterator[Rpc]:
    client = Rpc(own_daemon.url, "p" + uuid.uuid4().hex[:10])
    try:
        yield client
    finally:
        client.delete_all()


@pytest.fixture(scope="module")
def victim(own_daemon: Daemon) -> Iterator[str]:
    """Another customer's VM with a writable overlay in its directory."""
    other = Rpc(own_daemon.url, "victim-" + uuid.uuid4().hex[:6])
    vm_id = other.create()
    assert (own_daemon.data_dir / "vms" / vm_id / "disk0.qcow2").is_file()
    try:
        yield vm_id
    finally:
        other.delete_all()


@pytest.fixture(scope="module")
def traps(own_assets: Path, victim: str, own_daemon: Daemon) -> Path:
    """What an operator's mistake (or an attacker with a foothold) could leave in the assets dir."""
    links = {
        "shadow-link": "/etc/shadow",
        "etc-link": "/etc",
        "dev-zero-link": "/dev/zero",
        "victim-disk-link": str(own_daemon.data_dir / "vms" / victim / "disk0.qcow2"),
        "vms-link": str(own_daemon.data_dir / "vms"),
        "dotdot-link": "../../../../../../etc/shadow",
        "dangling-outside": "/etc/no-such-file",
        "inside-link": "rootfs.ext4",
    }
    for name, target in links.items():
        if not (own_assets / name).is_symlink():
            os.symlink(target, own_assets / name)
    if not (own_assets / "null-dev").exists():
        os.mknod(own_assets / "null-dev", 0o600 | 0o020000, os.makedev(1, 3))  # char device 1:3 (/dev/null)
        os.mkfifo(own_assets / "fifo")
        (own_assets / "subdir").mkdir()
    return own_assets


def refused(
    daemon: Daemon, rpc: Rpc, config: dict[str, Any], field: str, status: int = 400
) -> dict[str, Any]:
    vm_id = "atk-" + uuid.uuid4().hex[:12]
    before = set(os.listdir(daemon.data_dir / "vms"))
    code, body = rpc.error("CreateVm", {"vm_id": vm_id, "config": config})
    assert code == status, body
    assert body["message"].startswith(field), body["message"]
    assert body["details"][0]["debug"]["metadata"]["field"] == field
    assert rpc.error("GetVmInfo", {"vm_id": vm_id})[0] == 404, "no VM record"
    assert set(os.listdir(daemon.data_dir / "vms")) == before, "no VM directory"
    return body


def attacks(victim: str) -> list[tuple[str, dict[str, Any], str]]:
    return [
        ("dotdot kernel", {"boot": boot("/assets/../../etc/shadow")}, KERNEL),
        ("dotdot initrd", {"boot": boot(initrd="/assets/../metald.db")}, INITRD),
        ("absolute kernel", {"boot": boot("/etc/shadow")}, KERNEL),
        ("proc kernel", {"boot": boot("/proc/self/environ")}, KERNEL),
        ("relative kernel", {"boot": boot("assets/vmlinux")}, KERNEL),
        ("empty segment", {"boot": boot("/assets//etc/shadow")}, KERNEL),
        ("dot segment", {"boot": boot("/assets/./vmlinux")}, KERNEL),
        ("NUL byte", {"boot": boot("/assets/vmlinux\u0000/etc/shadow")}, KERNEL),
        ("trailing slash", {"boot": boot("/assets/vmlinux/")}, KERNEL),
        ("host device disk", {"storage": disk("/dev/sda")}, DISK),
        ("host device disk via dotdot", {"storage": disk("/assets/../../../dev/sda")}, DISK),
        ("other VM's disk via dotdot", {"storage": disk(f"/assets/../vms/{victim}/disk0.qcow2")}, DISK),
        ("symlink to /etc/shadow", {"storage": disk("/assets/shadow-link", read_only=True)}, DISK),
        ("symlinked dir to /etc", {"boot": boot("/assets/etc-link/shadow")}, KERNEL),
        ("symlink to /dev/zero", {"storage": disk("/assets/dev-zero-link")}, DISK),
        ("symlink to other VM's disk", {"storage": disk("/assets/victim-disk-link", read_only=True)}, DISK),
        ("symlinked dir to vms", {"storage": disk(f"/assets/vms-link/{victim}/disk0.qcow2")}, DISK),
        ("relative symlink out", {"boot": boot(initrd="/assets/dotdot-link")}, INITRD),
        ("dangling symlink out", {"boot": boot("/assets/dangling-outside")}, KERNEL),
        ("device node in assets", {"storage": disk("/assets/null-dev", read_only=True)}, DISK),
        ("FIFO in assets", {"boot": boot(initrd="/assets/fifo")}, INITRD),
        ("directory in assets", {"boot": boot("/assets/subdir")}, KERNEL),
        ("missing file", {"boot": boot("/assets/nope")}, KERNEL),
        ("console absolute", {"console": {"output_file": "/tmp/console.log"}}, CONSOLE),
        ("console dotdot", {"console": {"output_file": "../console.log"}}, CONSOLE),
        ("console in a subdir", {"console": {"output_file": "a/console.log"}}, CONSOLE),
        ("console over the pid file", {"console": {"output_file": "vmm.json"}}, CONSOLE),
        ("console over the QMP socket", {"console": {"output_file": "qmp.sock"}}, CONSOLE),
        ("console over the agent socket", {"console": {"output_file": "agent.sock"}}, CONSOLE),
        ("console over the overlay", {"console": {"output_file": "disk0.qcow2"}}, CONSOLE),
        ("console over the VMM log", {"console": {"output_file": "vmm.log"}}, CONSOLE),
        ("console over the serial log", {"console": {"output_file": "serial.log"}}, CONSOLE),
        ("console hidden", {"console": {"output_file": ".log"}}, CONSOLE),
    ]


def test_every_escape_is_refused_and_leaves_nothing(
    own_daemon: Daemon, rpc: Rpc, traps: Path, victim: str
) -> None:
    failures = []
    for name, config, field in attacks(victim):
        try:
            refused(own_daemon, rpc, config, field)
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)


def test_paths_that_stay_inside_are_accepted(own_daemon: Daemon, rpc: Rpc, traps: Path) -> None:
    """The positive control: a symlink within /assets/ and a console log name of one's own."""
    vm_id = rpc.create(
        {
            "boot": boot(),
            "storage": disk("/assets/inside-link"),
            "console": {"output_file": "my-console.log"},
        }
    )
    assert rpc.state(vm_id) == "VM_STATE_CREATED"


def test_symlink_swapped_after_create_is_refused_at_boot(own_daemon: Daemon, rpc: Rpc, traps: Path) -> None:
    """Paths are resolved again at every boot; what the VMM is given is the canonical path then."""
    link = traps / f"swap-{uuid.uuid4().hex[:6]}"
    os.symlink("rootfs.ext4", link)
    vm_id = rpc.create({"boot": boot(), "storage": disk(f"/assets/{link.name}", read_only=True)})
    tmp = link.with_name(link.name + ".new")
    os.symlink("/etc/shadow", tmp)
    os.replace(tmp, link)  # atomic swap, as an attacker would
    status, body = rpc.error("BootVm", {"vm_id": vm_id})
    assert status == 400 and body["message"].startswith(DISK), body
    assert rpc.state(vm_id) == "VM_STATE_CREATED"
    assert vmm_pids(own_daemon.data_dir / "vms" / vm_id) == [], "no VMM was started"


@pytest.fixture
def state_in_assets(tmp_path: Path, own_assets: Path) -> Iterator[Daemon]:
    """A daemon whose assets dir is its data dir: VM directories and the database are reachable
    under /assets/ by name, so only the resolver's refusal of metald's own state stands between."""
    data = tmp_path / "state"
    data.mkdir()
    for name in ("vmlinux", "initrd", "rootfs.ext4"):
        os.link(own_assets / name, data / name)
    with serving(Daemon(data, data, "--no-network-enabled", name="sec-stateassets")) as d:
        yield d


def test_metald_state_is_never_an_asset(state_in_assets: Daemon) -> None:
    owner = Rpc(state_in_assets.url, "owner")
    attacker = Rpc(state_in_assets.url, "attacker")
    vm_id = owner.create()
    for path in (f"/assets/vms/{vm_id}/disk0.qcow2", "/assets/metald.db"):
        body = refused(state_in_assets, attacker, {"storage": disk(path, read_only=True)}, DISK, status=403)
        assert body["code"] == "permission_denied"


def test_canonical_file_swapped_for_a_symlink_is_refused_at_boot(
    own_daemon: Daemon, rpc: Rpc, own_assets: Path, tmp_path: Path
) -> None:
    """An operator-side swap of the very file a VM was created with (not of a link to it) for a
    symlink to a file outside the root: the boot is refused, nothing runs and nothing leaks."""
    name = f"kernel-{uuid.uuid4().hex[:6]}"
    kernel = own_assets / name
    kernel.write_bytes((own_assets / "vmlinux").read_bytes())
    outside = tmp_path / "outside-kernel"
    outside.write_bytes(kernel.read_bytes())  # a real kernel: only its place is wrong
    vm_id = rpc.create({"boot": boot(f"/assets/{name}")})
    fds_before = len(os.listdir(f"/proc/{own_daemon.proc.pid}/fd")) if own_daemon.proc else 0
    swap = kernel.with_name(name + ".swap")
    os.symlink(outside, swap)
    os.replace(swap, kernel)
    for _ in range(3):
        status, body = rpc.error("BootVm", {"vm_id": vm_id})
        assert status in (400, 412) and body["message"].startswith(KERNEL), body
        assert body["details"][0]["debug"]["reason"] in ("INVALID_FIELD", "ASSET_CHANGED"), body
    assert rpc.state(vm_id) == "VM_STATE_CREATED"
    assert vmm_pids(own_daemon.data_dir / "vms" / vm_id) == [], "no VMM was started"
    assert own_daemon.proc is not None
    assert len(os.listdir(f"/proc/{own_daemon.proc.pid}/fd")) <= fds_before + 2, "descriptors leak"
    rpc.ok("DeleteVm", {"vm_id": vm_id})


@pytest.mark.parametrize(
    "content",
    [b"#!/bin/sh\necho not a kernel\n" * 50, os.urandom(64 * 1024), b""],
    ids=["text", "random", "empty"],
)
def test_a_kernel_that_is_not_a_kernel_is_refused_at_create(
    own_daemon: Daemon, rpc: Rpc, own_assets: Path, content: bytes
) -> None:
    name = f"junk-{uuid.uuid4().hex[:6]}"
    (own_assets / name).write_bytes(content)
    body = refused(own_daemon, rpc, {"boot": boot(f"/assets/{name}")}, KERNEL)
    assert body["code"] == "invalid_argument"
    assert body["details"][0]["debug"]["reason"] == "KERNEL_INVALID", body
