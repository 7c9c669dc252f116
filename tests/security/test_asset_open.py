"""Assets are opened beneath the assets root following no symlink (issue 11), in-process on real
files: the resolver's canonical path is checked, then the backend opens it; an operator-side swap
of a canonical file (or of a directory on its path) for a symlink in between must not hand QEMU a
file outside the root. It is refused as FAILED_PRECONDITION ASSET_CHANGED and nothing stays open."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from metald.assets import AssetResolver, open_beneath
from metald.backends.qemu.files import close_fds, open_vmm_files
from metald.domain.errors import ErrorCode, MetaldError
from metald.ports import DiskSpec, LaunchSpec
from tests.support.specs import bare_spec

KERNEL = b"\x7fELF a kernel inside the root"
OUTSIDE = b"\x7fELF a file outside the assets root"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "assets"
    (root / "kernels").mkdir(parents=True)
    (root / "kernels" / "vmlinux").write_bytes(KERNEL)
    (root / "rootfs.ext4").write_bytes(b"disk")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "vmlinux").write_bytes(OUTSIDE)
    return root.resolve()


def _swap_file(path: Path, target: Path) -> None:
    tmp = path.with_name(path.name + ".swap")
    os.symlink(target, tmp)
    os.replace(tmp, path)  # atomic, as a careless deploy script (or an intruder) would


def _swap_dir(path: Path, target: Path) -> None:
    os.rename(path, path.with_name(path.name + ".old"))
    os.symlink(target, path)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _spec(root: Path, vm_dir: Path) -> LaunchSpec:
    vm_dir.mkdir()
    disks = (DiskSpec("root", root / "rootfs.ext4", read_only=True, is_root=True),)
    return bare_spec(
        "vm-swap", vm_dir, root / "kernels" / "vmlinux", disks, memory_bytes=64 << 20, assets_root=root
    )


def test_the_canonical_file_opens(root: Path) -> None:
    fd = open_beneath(root, root / "kernels" / "vmlinux", os.O_RDONLY)
    try:
        assert os.pread(fd, 64, 0) == KERNEL
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "swap",
    [
        lambda root: _swap_file(root / "kernels" / "vmlinux", root.parent / "outside" / "vmlinux"),
        lambda root: _swap_dir(root / "kernels", root.parent / "outside"),
        lambda root: _swap_file(root / "kernels" / "vmlinux", Path("rootfs.ext4")),  # even inside
    ],
    ids=["file", "directory", "file-to-inside"],
)
def test_a_symlink_swapped_in_is_asset_changed(root: Path, swap: Callable[[Path], None]) -> None:
    before = _open_fds()
    swap(root)
    with pytest.raises(MetaldError) as caught:
        open_beneath(root, root / "kernels" / "vmlinux", os.O_RDONLY)
    assert (caught.value.code, caught.value.reason) == (ErrorCode.FAILED_PRECONDITION, "ASSET_CHANGED")
    assert _open_fds() == before


def test_a_path_outside_the_root_is_not_opened_beneath_it(root: Path) -> None:
    with pytest.raises(ValueError):
        open_beneath(root, root.parent / "outside" / "vmlinux", os.O_RDONLY)


@pytest.mark.parametrize("swapped", ["kernel", "disk"])
def test_the_backend_refuses_an_asset_swapped_after_the_check(
    root: Path, tmp_path: Path, swapped: str
) -> None:
    """The QEMU backend's file opening, given a spec the service resolved a moment before."""
    spec = _spec(root, tmp_path / "vm")
    fds = open_vmm_files(spec)
    assert os.pread(fds.kernel, 64, 0) == KERNEL
    close_fds(fds)
    before = _open_fds()
    victim = spec.kernel if swapped == "kernel" else spec.disks[0].host_path
    _swap_file(victim, root.parent / "outside" / "vmlinux")
    with pytest.raises(MetaldError) as caught:
        open_vmm_files(spec)
    assert (caught.value.code, caught.value.reason) == (ErrorCode.FAILED_PRECONDITION, "ASSET_CHANGED")
    assert caught.value.metadata == {"asset": victim.name}
    assert _open_fds() == before, "a refused launch leaves no descriptor open"


async def test_kernel_check_at_create_and_at_boot(root: Path) -> None:
    resolver = AssetResolver(root)
    field = "config.boot.kernel_path"
    assert await resolver.resolve_kernel("/assets/kernels/vmlinux", field) == root / "kernels" / "vmlinux"
    (root / "notes.txt").write_text("not a kernel\n")
    for accepted, code in ((False, ErrorCode.INVALID_ARGUMENT), (True, ErrorCode.FAILED_PRECONDITION)):
        with pytest.raises(MetaldError) as caught:
            await resolver.resolve_kernel("/assets/notes.txt", field, accepted=accepted)
        assert (caught.value.code, caught.value.reason) == (code, "KERNEL_INVALID")
