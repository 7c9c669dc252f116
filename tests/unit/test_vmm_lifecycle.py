"""The shared VMM lifecycle when everything is already gone (a host reboot): adopt finds nothing and
says why, and stop/destroy of what is gone succeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metald.backends.vmm.lifecycle import GONE_WHILE_DOWN, VmmLifecycle
from metald.domain.errors import ErrorCode, MetaldError
from metald.ports import DiskSpec, LaunchSpec
from tests.support.specs import bare_spec


class _Channel:
    async def close(self) -> None:
        pass


def _spec(vm_dir: Path) -> LaunchSpec:
    disks = (
        DiskSpec("data", Path("/assets/data.ext4"), read_only=True, is_root=False),
        DiskSpec("root", Path("/assets/rootfs.ext4"), read_only=False, is_root=True),
    )
    return bare_spec("vm-gone", vm_dir, Path("/assets/vmlinux"), disks, memory_bytes=128 << 20)


def _never(_: object) -> bool:
    return False


async def test_a_vm_whose_vmm_and_files_are_gone_is_not_adopted_and_says_why(tmp_path: Path) -> None:
    vms: VmmLifecycle[_Channel] = VmmLifecycle("QEMU", runtime_files=("qmp.sock",))
    spec = _spec(tmp_path / "missing-dir")  # even the VM's directory is gone
    assert await vms.attach(spec, _never) is None
    assert vms.last_exit_reason("vm-gone") == GONE_WHILE_DOWN
    assert await vms.stop("vm-gone", None) == "not_running"
    await vms.kill_orphan("vm-gone", spec.vm_dir, _never)  # destroy of what is gone: success
    assert vms.last_exit_reason("vm-gone") is None
    with pytest.raises(MetaldError) as err:
        await vms.wait_ready("vm-gone", 1.0)
    assert err.value.code is ErrorCode.FAILED_PRECONDITION and err.value.reason == "VM_EXITED"


async def test_an_exit_recorded_while_the_daemon_was_down_is_kept(tmp_path: Path) -> None:
    vms: VmmLifecycle[_Channel] = VmmLifecycle("QEMU", runtime_files=("qmp.sock",))
    spec = _spec(tmp_path)
    (tmp_path / "exit.json").write_text(json.dumps({"returncode": 0, "oom_killed": False}))
    (tmp_path / "qmp.sock").write_text("")
    assert await vms.attach(spec, _never) is None
    assert vms.last_exit_reason("vm-gone") == "guest_poweroff"
    assert not (tmp_path / "qmp.sock").exists() and not (tmp_path / "exit.json").exists()


def test_launch_specs_order_disks_once_root_first() -> None:
    assert [d.device_id for d in _spec(Path("/x")).disks] == ["root", "data"]
