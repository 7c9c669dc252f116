"""Pure logic of the guest image builder: package selection, manifest decisions, kernel, cpio."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from metald.guest import GuestBuildError, apt, builder, cpio
from metald.guest.apt import GuestPackages, Package
from metald.guest.kernel import ModuleIndex, bzimage_payload, decompress, module_name

SHOW = """\
Package: linux-image-cloud-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
Description: Linux for x86-64 cloud (meta-package)
 This package depends on the latest Linux kernel.

Package: busybox-static
Source: busybox (1:1.35.0-4+deb12u1)
Version: 1:1.35.0-4+deb12u1+b1
Filename: pool/main/b/busybox/busybox-static_1.35.0-4+deb12u1+b1_amd64.deb
"""

PACKAGES = GuestPackages(
    "6.1.0-56-cloud-amd64",
    Package("linux-image-6.1.0-56-cloud-amd64-unsigned", "6.1.192-2"),
    Package("busybox-static", "1:1.35.0-4+deb12u1+b1"),
)


# --- package selection -------------------------------------------------------------------------


def test_kernel_follows_the_cloud_metapackage() -> None:
    stanzas = apt.parse_show(SHOW)
    assert stanzas["busybox-static"]["Version"] == "1:1.35.0-4+deb12u1+b1"
    assert stanzas["linux-image-cloud-amd64"]["Description"] == "Linux for x86-64 cloud (meta-package)"
    assert apt.kernel_from_meta(stanzas) == PACKAGES.kernel


def test_no_metapackage_means_no_kernel_from_it() -> None:
    assert apt.kernel_from_meta(apt.parse_show(SHOW.split("\n\n")[1])) is None


def test_newest_unsigned_compares_abi_numerically() -> None:
    names = [
        "linux-image-6.1.0-9-cloud-amd64-unsigned",
        "linux-image-6.1.0-56-cloud-amd64-unsigned",
        "linux-image-6.1.0-47-cloud-amd64-unsigned",
        "linux-image-6.1.0-99-cloud-amd64",  # signed: not usable
        "linux-image-6.1.0-99-amd64-unsigned",  # not the cloud flavour
        "linux-image-6.12.117+deb12-cloud-amd64-unsigned",  # other naming scheme
    ]
    assert apt.newest_unsigned(names) == "linux-image-6.1.0-56-cloud-amd64-unsigned"
    assert apt.newest_unsigned(["busybox-static"]) is None


def test_deb_glob_quotes_the_epoch() -> None:
    assert PACKAGES.busybox.deb_glob == "busybox-static_1%3a1.35.0-4+deb12u1+b1_*.deb"
    assert PACKAGES.kernel.spec == "linux-image-6.1.0-56-cloud-amd64-unsigned=6.1.192-2"


def test_offline_fallback_uses_newest_cached_debs() -> None:
    found = apt.packages_from_debs(
        [
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb",
            "linux-image-6.1.0-47-cloud-amd64-unsigned_6.1.170-3_amd64.deb",
            "linux-image-6.1.0-56-cloud-amd64-unsigned_6.1.192-2_amd64.deb",
            "unpacked",
        ]
    )
    assert found == PACKAGES
    assert apt.packages_from_debs(["busybox-static_1%3a1.35.0-4_amd64.deb"]) is None


def _fake_apt(monkeypatch: pytest.MonkeyPatch, answers: dict[str, str | None]) -> list[str]:
    """Replace apt's subprocess runner: answers maps a command line to stdout (None: failure).
    The apt lists dir is one that does not exist, so resolutions are not remembered."""
    calls: list[str] = []
    monkeypatch.setattr(apt, "APT_LISTS", Path("/nonexistent/apt/lists"))

    async def run(*argv: str, **_: Any) -> bytes:
        cmd = " ".join(argv)
        calls.append(cmd)
        out = answers[cmd]
        if out is None:
            raise GuestBuildError(f"{cmd} failed")
        return out.encode()

    monkeypatch.setattr(apt, "run", run)
    return calls


async def test_resolve_prefers_metapackage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _fake_apt(
        monkeypatch, {"apt-cache show --no-all-versions linux-image-cloud-amd64 busybox-static": SHOW}
    )
    assert await apt.resolve_packages(tmp_path) == PACKAGES
    assert len(calls) == 1


async def test_resolution_is_remembered_until_apt_lists_change(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = _fake_apt(
        monkeypatch, {"apt-cache show --no-all-versions linux-image-cloud-amd64 busybox-static": SHOW}
    )
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages").touch()
    monkeypatch.setattr(apt, "APT_LISTS", lists)
    cache = tmp_path / "cache"
    cache.mkdir()
    for _ in range(2):
        assert await apt.resolve_packages(cache) == PACKAGES
    assert len(calls) == 1
    (lists / "deb.debian.org_debian-security_dists_bookworm-security_main_binary-amd64_Packages").touch()
    os.utime(lists, ns=(1, time.time_ns() + 10**9))
    assert await apt.resolve_packages(cache) == PACKAGES
    assert len(calls) == 2


async def test_resolve_falls_back_to_newest_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    name = "linux-image-6.1.0-57-cloud-amd64-unsigned"
    _fake_apt(
        monkeypatch,
        {
            "apt-cache show --no-all-versions linux-image-cloud-amd64 busybox-static": SHOW.split("\n\n")[1],
            "apt-cache pkgnames linux-image-": f"linux-image-6.1.0-47-cloud-amd64-unsigned\n{name}\n",
            f"apt-cache show --no-all-versions {name}": f"Package: {name}\nVersion: 6.1.192-3\n",
        },
    )
    resolved = await apt.resolve_packages(tmp_path)
    assert resolved.kernel == Package(name, "6.1.192-3")
    assert resolved.kernel_version == "6.1.0-57-cloud-amd64"


async def test_resolve_offline_uses_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_apt(monkeypatch, {"apt-cache show --no-all-versions linux-image-cloud-amd64 busybox-static": None})
    with pytest.raises(GuestBuildError, match="apt-get update"):
        await apt.resolve_packages(tmp_path)
    for deb in (
        "linux-image-6.1.0-56-cloud-amd64-unsigned_6.1.192-2_amd64.deb",
        "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb",
    ):
        (tmp_path / deb).touch()
    assert await apt.resolve_packages(tmp_path) == PACKAGES


# --- manifest / idempotency --------------------------------------------------------------------


def _manifest(inputs: dict[str, str], hashes: dict[str, str]) -> dict[str, Any]:
    return {
        "builder_version": builder.BUILDER_VERSION,
        "inputs": inputs,
        "outputs": {name: {"sha256": h, "size": 1} for name, h in hashes.items()},
    }


def test_manifest_decision() -> None:
    inputs = builder.build_inputs(PACKAGES, {"rootfs/etc/rc": b"#!/bin/sh\n"})
    hashes = {name: f"sha-{name}" for name in builder.OUTPUTS}
    manifest = _manifest(inputs, hashes)
    assert builder.manifest_is_current(manifest, inputs)
    assert builder.outputs_intact(manifest, hashes)

    assert not builder.manifest_is_current(None, inputs)
    assert not builder.manifest_is_current({**manifest, "builder_version": "0"}, inputs)
    assert not builder.manifest_is_current({**manifest, "outputs": {"vmlinux": {}}}, inputs)
    newer_kernel = GuestPackages(
        "6.1.0-57-cloud-amd64",
        Package("linux-image-6.1.0-57-cloud-amd64-unsigned", "6.1.192-3"),
        PACKAGES.busybox,
    )
    assert not builder.manifest_is_current(manifest, builder.build_inputs(newer_kernel, {}))
    edited = builder.build_inputs(PACKAGES, {"rootfs/etc/rc": b"#!/bin/sh\necho\n"})
    assert not builder.manifest_is_current(manifest, edited)

    assert not builder.outputs_intact(manifest, {**hashes, "initrd": "other"})
    assert not builder.outputs_intact(manifest, {**hashes, "data.ext4": None})


def _publish(work: Path, assets: Path, inputs: dict[str, str], content: dict[str, bytes]) -> dict[str, Any]:
    """Publish `content` (output name -> bytes) as a build would; returns the manifest."""
    work.mkdir()
    outputs = {}
    for name, data in content.items():
        (work / name).write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        outputs[name] = {"sha256": sha, "size": len(data), "file": builder.versioned_name(name, sha)}
    manifest = {"builder_version": builder.BUILDER_VERSION, "inputs": inputs, "outputs": outputs}
    builder._publish(work, assets, manifest)
    return manifest


def test_versioned_names() -> None:
    sha = "0123456789abcdef" + "f" * 48
    assert builder.versioned_name("rootfs.ext4", sha) == "rootfs-0123456789abcdef.ext4"
    assert builder.versioned_name("vmlinux", sha) == "vmlinux-0123456789abcdef"


def test_publish_adds_versions_and_never_touches_one(tmp_path: Path) -> None:
    assets = tmp_path / "assets"
    assets.mkdir()
    first = _publish(tmp_path / "w1", assets, {}, {name: f"{name} v1".encode() for name in builder.OUTPUTS})
    v1 = {name: assets / first["outputs"][name]["file"] for name in builder.OUTPUTS}
    v1_inode = v1["rootfs.ext4"].stat().st_ino
    assert os.readlink(assets / "rootfs.ext4") == v1["rootfs.ext4"].name  # relative: the dir may move
    changed = {name: f"{name} v{'2' if name == 'rootfs.ext4' else '1'}".encode() for name in builder.OUTPUTS}
    second = _publish(tmp_path / "w2", assets, {}, changed)
    assert (assets / "rootfs.ext4").read_bytes() == b"rootfs.ext4 v2"
    assert v1["rootfs.ext4"].read_bytes() == b"rootfs.ext4 v1" and v1["rootfs.ext4"].stat().st_ino == v1_inode
    assert second["outputs"]["vmlinux"]["file"] == first["outputs"]["vmlinux"]["file"]  # same content
    assert json.loads((assets / builder.MANIFEST).read_text()) == second
    # A version whose content is not what its name says is never overwritten, and never current.
    v1["initrd"].write_bytes(b"tampered")
    with pytest.raises(GuestBuildError, match="other content"):
        _publish(tmp_path / "w3", assets, {}, changed)
    assert v1["initrd"].read_bytes() == b"tampered"
    assert json.loads((assets / builder.MANIFEST).read_text()) == second


async def test_build_is_skipped_only_when_current(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assets, cache = tmp_path / "assets", tmp_path / "cache"
    assets.mkdir()
    inputs = builder.build_inputs(PACKAGES, builder.guest_files())
    _publish(tmp_path / "work", assets, inputs, {name: name.encode() for name in builder.OUTPUTS})
    builds: list[Path] = []

    async def resolve(_: Path) -> GuestPackages:
        return PACKAGES

    async def build(assets_dir: Path, *_: object) -> None:
        builds.append(assets_dir)

    monkeypatch.setattr(builder, "resolve_packages", resolve)
    monkeypatch.setattr(builder, "_build", build)

    image = await builder.build_guest_image(assets, cache)
    assert (image.rebuilt, builds) == (False, [])
    assert image.vmlinux == assets / "vmlinux" and image.kernel_version == PACKAGES.kernel_version
    assert (await builder.build_guest_image(assets, cache, force=True)).rebuilt
    (assets / "initrd").resolve().write_bytes(b"tampered")
    assert (await builder.build_guest_image(assets, cache)).rebuilt
    # The layout before versions (plain files under the plain names) is rebuilt, not trusted.
    (assets / "initrd").unlink()
    (assets / "initrd").write_bytes(b"initrd")
    assert (await builder.build_guest_image(assets, cache)).rebuilt
    assert builds == [assets, assets, assets]


# --- kernel ------------------------------------------------------------------------------------


def _bzimage(payload: bytes, setup_sects: int = 3, offset: int = 100) -> bytes:
    image = bytearray((setup_sects + 1) * 512 + offset)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", image, 0x248, offset, len(payload))
    return bytes(image) + payload + b"trailing junk"


async def test_vmlinux_from_gzip_bzimage() -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 64
    fmt, payload = bzimage_payload(_bzimage(gzip.compress(elf)))
    assert fmt == "gzip"
    assert await decompress(payload, fmt) == elf


async def test_vmlinux_from_xz_bzimage_strips_size_append() -> None:
    elf = b"\x7fELF" + b"kernel" * 1000
    fmt, payload = bzimage_payload(_bzimage(lzma.compress(elf) + struct.pack("<I", len(elf))))
    assert fmt == "xz"
    assert await decompress(payload, fmt) == elf


def test_bzimage_rejects_garbage() -> None:
    with pytest.raises(GuestBuildError, match="not a bzImage"):
        bzimage_payload(bytes(4096))
    with pytest.raises(GuestBuildError, match="unknown kernel compression"):
        bzimage_payload(_bzimage(b"\x00\x01\x02\x03\x04\x05\x06\x07"))


MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko.zst: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/input/evdev.ko:
"""


def test_module_load_order_puts_dependencies_first_and_skips_builtins() -> None:
    index = ModuleIndex.parse(MODULES_DEP, "kernel/fs/ext4/ext4.ko\nkernel/crypto/crc32c_generic.ko\n")
    order = index.load_order(["virtio", "virtio_ring", "virtio_mmio", "virtio_net", "evdev", "ext4"])
    assert order == [
        "virtio_ring",
        "virtio",
        "virtio_mmio",
        "failover",
        "net_failover",
        "virtio_net",
        "evdev",
    ]
    assert index.paths["virtio_net"] == "kernel/drivers/net/virtio_net.ko.zst"
    with pytest.raises(GuestBuildError, match="virtio_blk"):
        index.load_order(["virtio_blk"])


def test_module_name_normalises() -> None:
    assert module_name("kernel/drivers/net/virtio_net.ko.zst") == "virtio_net"
    assert module_name("kernel/crypto/crc32c-generic.ko") == "crc32c_generic"


# --- initramfs archive and guest scripts -------------------------------------------------------


def _parse_newc(data: bytes) -> list[tuple[str, int, bytes, int, int]]:
    members: list[tuple[str, int, bytes, int, int]] = []
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos : pos + filesize]
        pos += filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            return members
        members.append((name, fields[1], body, fields[9], fields[10]))


def test_newc_archive_round_trips() -> None:
    entries = [
        cpio.directory("bin"),
        cpio.file("bin/busybox", b"\x7fELF...", 0o755),
        cpio.symlink("bin/sh", "busybox"),
        cpio.char_device("dev/console", 5, 1),
        cpio.file("init", b"#!/bin/sh\n", 0o755),
    ]
    members = _parse_newc(cpio.newc_archive(entries))
    assert [(m[0], m[1], m[2]) for m in members] == [(e.path, e.mode, e.data) for e in entries]
    assert members[3][3:] == (5, 1)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_newc_archive_is_readable_by_gnu_cpio(tmp_path: Path) -> None:
    archive = cpio.newc_archive([cpio.directory("etc"), cpio.file("etc/hostname", b"vm\n")])
    subprocess.run(["cpio", "-id", "--quiet"], input=archive, cwd=tmp_path, check=True)
    assert (tmp_path / "etc" / "hostname").read_bytes() == b"vm\n"


def test_guest_files_are_complete_and_parse() -> None:
    files = builder.guest_files()
    for path in (
        "initramfs/init",
        "rootfs/etc/inittab",
        "rootfs/etc/rc",
        "rootfs/etc/rc.shutdown",
        "rootfs/etc/acpi/PWRF/00000080",
        "rootfs/sbin/metald-agent",
        "rootfs/sbin/metald-say",
    ):
        assert path in files, path
    scripts = [p for p, data in files.items() if data.startswith(b"#!")]
    assert len(scripts) == 6
    for path in scripts:
        subprocess.run(["sh", "-n", str(builder.FILES_DIR / path)], check=True)
    assert b"org.metald.agent" in files["rootfs/sbin/metald-agent"]
    assert b"METALD_READY vm_id=$vm_id boot_id=" in files["rootfs/etc/rc"]
