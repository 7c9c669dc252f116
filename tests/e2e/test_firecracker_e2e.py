"""End to end on a real Firecracker: boot the default guest image through the backend and drive its
lifecycle. Runs only where a `firecracker` binary is on PATH and KVM really works; elsewhere (this
kind of host: no Firecracker package, nested-PVM KVM) every test is skipped with the reason.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from metald.backends.firecracker import FirecrackerBackend
from metald.backends.select import kvm_usable
from metald.ports import DiskSpec, LaunchSpec
from tests.integration.firecracker_double import destroy_leftovers
from tests.support.specs import bare_spec

pytestmark = pytest.mark.e2e

READY_TIMEOUT = 60.0


@pytest.fixture
async def firecracker() -> str:
    binary = shutil.which("firecracker")
    if binary is None:
        pytest.skip("no firecracker binary on PATH")
    if not await kvm_usable():
        pytest.skip("/dev/kvm is missing or cannot create a VM")
    return binary


@pytest.fixture
async def backend(firecracker: str, tmp_path: Path) -> AsyncIterator[FirecrackerBackend]:
    backend = FirecrackerBackend(
        firecracker_binary=firecracker, chroot_base=tmp_path / "jail", vmm_uid=None, vmm_gid=None
    )
    yield backend
    await backend.close()
    await destroy_leftovers(tmp_path)


@pytest.fixture
def spec(backend: FirecrackerBackend, request: pytest.FixtureRequest, tmp_path: Path) -> LaunchSpec:
    assets: Path = request.getfixturevalue("assets_dir")  # built only once Firecracker can run
    vm_dir = tmp_path / "vm_e2e-1"
    disks = (DiskSpec("rootfs", assets / "rootfs.ext4", read_only=False, is_root=True),)
    return bare_spec(
        "vm_e2e-1",
        vm_dir,
        assets / "vmlinux",
        disks,
        initrd=assets / "initrd",
        guest_kernel_args="metald.vm_id=vm_e2e-1",
    )


async def test_default_guest_lifecycle(backend: FirecrackerBackend, spec: LaunchSpec) -> None:
    await backend.prepare(spec)
    await backend.start(spec)
    assert await backend.wait_ready(spec.vm_id, READY_TIMEOUT), spec.console_path.read_text()[-2000:]
    await backend.pause(spec.vm_id)
    await backend.resume(spec.vm_id)
    metrics = await backend.metrics(spec.vm_id)
    assert metrics.cpu_time_nanos > 0 and metrics.memory_usage_bytes > 0
    await backend.reboot(spec.vm_id, force=False)
    assert await backend.wait_ready(spec.vm_id, READY_TIMEOUT)
    assert await backend.stop(spec.vm_id, graceful=True, timeout=30) == "guest_poweroff"
    await backend.destroy(spec.vm_id, spec.vm_dir)
    assert not spec.vm_dir.exists()
