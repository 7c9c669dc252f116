"""The Firecracker backend hands its assets over open (issue 11), against the Firecracker double:
kernel, initrd and drives are opened beneath the assets root following no symlink, then linked into
the jail from the descriptor (jailed) or inherited by Firecracker as /proc/self/fd/N (unjailed). An
asset an operator-side swap turned into a symlink after the service resolved it (here: just before
the start) is refused as FAILED_PRECONDITION ASSET_CHANGED, before any file, jail or process is made,
and the daemon keeps no descriptor. tests/security/test_asset_open.py is the QEMU side."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from metald.backends.firecracker import FirecrackerBackend, launch
from metald.domain.errors import ErrorCode, MetaldError
from metald.ports import LaunchSpec
from tests.integration.firecracker_double import FakeFirecracker, closing_backends, launch_spec

OUTSIDE = b"\x7fELF a file outside the assets root"
DISKS = (("rootfs", False, True), ("seed", True, False))  # a writable root (copied), a read-only disk
NewBackend = Callable[[bool], FirecrackerBackend]


@pytest.fixture
def root() -> Iterator[Path]:
    """Short: the jailed double binds its API socket at a host path (108 bytes at most)."""
    path = Path(tempfile.mkdtemp(prefix="fcasset-")).resolve()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def new_backend(root: Path) -> AsyncIterator[NewBackend]:
    fake = FakeFirecracker.install(root / "bin")
    async with closing_backends(root) as made:

        def make(jailed: bool) -> FirecrackerBackend:
            made.append(fake.backend(root, jailed=jailed))
            return made[-1]

        yield make


def spec_under(root: Path) -> LaunchSpec:
    """A VM whose assets are under root/assets, resolved as the service does (assets_root set)."""
    (root / "outside").mkdir(exist_ok=True)
    (root / "outside" / "vmlinux").write_bytes(OUTSIDE)
    spec = launch_spec(root, initrd=True, disks=DISKS)
    return dataclasses.replace(spec, assets_root=root / "assets")


def swap(path: Path, target: Path) -> None:
    tmp = path.with_name(path.name + ".swap")
    os.symlink(target, tmp)
    os.replace(tmp, path)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def points_at(pid: int | str, path: Path) -> list[str]:
    """The descriptors of process `pid` open on `path`."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                out.append(fd)
        except FileNotFoundError:
            pass
    return out


def jail_of(root: Path, spec: LaunchSpec) -> Path:
    return launch.jail_dir(root / "jail", "firecracker", launch.firecracker_id(spec.vm_id))


async def test_unjailed_firecracker_inherits_its_assets_open(new_backend: NewBackend, root: Path) -> None:
    spec = spec_under(root)
    runtime = await new_backend(False).start(spec)
    bodies = {r["path"]: r["body"] for r in FakeFirecracker(root / "bin").requests()}
    given = {
        spec.kernel: bodies["/boot-source"]["kernel_image_path"],
        spec.initrd: bodies["/boot-source"]["initrd_path"],
        spec.disks[1].host_path: bodies["/drives/seed"]["path_on_host"],
    }
    for asset, path in given.items():
        assert path.startswith("/proc/self/fd/"), path  # never the asset's path
        assert os.readlink(f"/proc/{runtime.pid}/fd/{path.rsplit('/', 1)[1]}") == str(asset)
        assert points_at("self", asset) == [], "the daemon keeps no descriptor of an asset"
    assert bodies["/drives/rootfs"]["path_on_host"] == str(spec.vm_dir / "drive-rootfs.img")


async def test_jailed_firecracker_gets_links_to_the_opened_files(new_backend: NewBackend, root: Path) -> None:
    spec = spec_under(root)
    await new_backend(True).start(spec)
    jail = jail_of(root, spec) / "root"
    for asset, name in (
        (spec.kernel, "vmlinux"),
        (spec.initrd, "initrd"),
        (spec.disks[1].host_path, "drive-seed.img"),
    ):
        assert asset is not None and (jail / name).stat().st_ino == asset.stat().st_ino
        assert points_at("self", asset) == []


@pytest.mark.parametrize("jailed", [True, False], ids=["jailed", "unjailed"])
@pytest.mark.parametrize("victim", ["kernel", "initrd", "rootfs", "seed"])
async def test_an_asset_swapped_before_the_start_is_refused(
    new_backend: NewBackend, root: Path, jailed: bool, victim: str
) -> None:
    """`rootfs` is the writable drive's source (copied at prepare), `seed` a read-only drive."""
    spec = spec_under(root)
    path = {"kernel": spec.kernel, "initrd": spec.initrd, "rootfs": spec.disks[0].host_path}.get(
        victim, spec.disks[1].host_path
    )
    assert path is not None
    backend = new_backend(jailed)
    before = open_fds()
    swap(path, root / "outside" / "vmlinux")
    with pytest.raises(MetaldError) as caught:
        await backend.start(spec)
    assert (caught.value.code, caught.value.reason) == (ErrorCode.FAILED_PRECONDITION, "ASSET_CHANGED")
    assert caught.value.metadata == {"asset": path.name}
    assert open_fds() <= before, "a refused start leaves no descriptor open"  # others may close theirs
    assert FakeFirecracker(root / "bin").records() == [], "no Firecracker was started"
    assert not spec.vm_dir.exists() and not jail_of(root, spec).exists(), "nothing was laid out"
    assert await backend.runtime(spec.vm_id) is None


@pytest.mark.parametrize("jailed", [True, False], ids=["jailed", "unjailed"])
async def test_a_kernel_swapped_after_create_is_refused_at_boot(
    new_backend: NewBackend, root: Path, jailed: bool
) -> None:
    """Created (prepared) first, as CreateVm does; the swap comes before BootVm."""
    spec = spec_under(root)
    backend = new_backend(jailed)
    await backend.prepare(spec)
    swap(spec.kernel, root / "outside" / "vmlinux")
    before = open_fds()
    with pytest.raises(MetaldError) as caught:
        await backend.start(spec)
    assert (caught.value.code, caught.value.reason) == (ErrorCode.FAILED_PRECONDITION, "ASSET_CHANGED")
    assert open_fds() <= before
    assert FakeFirecracker(root / "bin").records() == []
    outside = (root / "outside" / "vmlinux").stat().st_ino
    assert all(p.stat().st_ino != outside for p in root.joinpath("jail").rglob("*") if p.is_file())
    assert all(p.stat().st_ino != outside for p in spec.vm_dir.rglob("*") if p.is_file())
    # Put back, the same VM boots: the refusal left it intact.
    os.unlink(spec.kernel)
    spec.kernel.write_bytes(b"\x7fELF kernel")
    assert (await backend.start(spec)).pid > 0
