"""Builds the guest image from Debian packages, without mounts or loop devices.

Outputs in the assets dir: ``vmlinux`` (uncompressed ELF, booted through its PVH entry), ``initrd``
(gzip newc cpio: busybox, virtio modules, an init that switch_roots into /dev/vda),
``rootfs.ext4`` (64 MiB, label vmroot, made with ``mkfs.ext4 -d``), ``data.ext4`` (16 MiB, empty,
label data) and ``manifest.json``. A build whose inputs and outputs match the manifest is a no-op.

Versions: each output is a content-addressed file (``rootfs-<sha256[:16]>.ext4``, ``vmlinux-<...>``)
that is never modified once published, and the plain name is a relative symlink to the current
version, swapped atomically (the manifest last). A VM's writable disk is a qcow2 overlay over the
canonical path of the version current when the VM was created (the asset resolver resolves the
link), so a rebuild changes what new VMs get and never the base under an existing overlay.

Old versions are kept. One may be deleted once no link points at it and no VM references it: a
QEMU VM names the bases of its overlays in ``<data_dir>/vms/<vm>/disks.json``, and every VM's
kernel, initrd and read-only disks are resolved again at each boot, so e.g.
``grep -l rootfs-<sha> <data_dir>/vms/*/disks.json`` must find nothing (Firecracker VMs copy
their writable disks and do not reference a version after CreateVm).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gzip
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from metald.backends.vmm.jsonfile import read_json
from metald.guest import cpio
from metald.guest.apt import GuestPackages, download, prune_cache, resolve_packages, unpack
from metald.guest.kernel import ModuleIndex, extract_vmlinux
from metald.guest.proc import REQUIRED_TOOLS, GuestBuildError, require_tools, run

log = logging.getLogger(__name__)

BUILDER_VERSION = "3"  # 2: content-addressed versions behind symlinks; 3: compiled guest agent
FILES_DIR = Path(__file__).parent / "files"
OUTPUTS = ("vmlinux", "initrd", "rootfs.ext4", "data.ext4")
MANIFEST = "manifest.json"
AGENT_SOURCE = "src/metald-agent.c"  # compiled into the rootfs as /sbin/metald-agentd
# Static, stripped, without build paths: the same source and compiler give the same bytes.
AGENT_CFLAGS = ("-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror", "-ffile-prefix-map=/=/")
ROOTFS_SIZE = "64M"
DATA_SIZE = "16M"
# Loaded by the initramfs, each after its dependencies; built-in ones are skipped.
MODULES = (
    "virtio", "virtio_ring", "virtio_mmio", "virtio_blk", "failover", "net_failover", "virtio_net",
    "virtio_console", "virtio_balloon", "button", "evdev", "crc32c_generic", "ext4",
)  # fmt: skip
INITRAMFS_APPLETS = ("sh", "cat", "insmod", "mount", "umount", "sleep", "switch_root")
ROOTFS_DIRS = (
    "bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "proc", "sys", "dev", "tmp", "run", "var",
    "mnt", "data",
)  # fmt: skip


@dataclass(frozen=True)
class GuestImage:
    """Paths of a built guest image."""

    vmlinux: Path
    initrd: Path
    rootfs: Path
    data_disk: Path
    manifest: Path
    kernel_version: str
    rebuilt: bool  # False when the existing image was already up to date

    @classmethod
    def in_dir(cls, assets_dir: Path, kernel_version: str, rebuilt: bool) -> GuestImage:
        return cls(
            vmlinux=assets_dir / "vmlinux",
            initrd=assets_dir / "initrd",
            rootfs=assets_dir / "rootfs.ext4",
            data_disk=assets_dir / "data.ext4",
            manifest=assets_dir / MANIFEST,
            kernel_version=kernel_version,
            rebuilt=rebuilt,
        )


def guest_files() -> dict[str, bytes]:
    """The guest-side files shipped as package data, by path relative to files/."""
    return {
        p.relative_to(FILES_DIR).as_posix(): p.read_bytes()
        for p in sorted(FILES_DIR.rglob("*"))
        if p.is_file()
    }


def build_inputs(packages: GuestPackages, files: Mapping[str, bytes]) -> dict[str, str]:
    """Everything besides the builder version that determines the image."""
    digest = hashlib.sha256()
    for path, data in sorted(files.items()):
        digest.update(f"{path}\0{len(data)}\0".encode() + data)
    return {
        "kernel_package": packages.kernel.spec,
        "busybox_package": packages.busybox.spec,
        "guest_files_sha256": digest.hexdigest(),
    }


def manifest_is_current(
    manifest: Mapping[str, Any] | None, inputs: Mapping[str, str]
) -> TypeGuard[Mapping[str, Any]]:
    """True if manifest was written by this builder version from these inputs, for all outputs."""
    return (
        manifest is not None
        and manifest.get("builder_version") == BUILDER_VERSION
        and manifest.get("inputs") == dict(inputs)
        and isinstance(manifest.get("outputs"), dict)
        and set(manifest["outputs"]) == set(OUTPUTS)
    )


def versioned_name(name: str, sha256: str) -> str:
    """The file a version of output `name` is published as: rootfs.ext4 -> rootfs-<sha[:16]>.ext4."""
    stem, dot, suffix = name.partition(".")
    return f"{stem}-{sha256[:16]}{dot}{suffix}"


def outputs_intact(manifest: Mapping[str, Any], actual: Mapping[str, str | None]) -> bool:
    """True if every output exists with the sha256 the manifest recorded."""
    return all(
        actual.get(name) is not None and actual[name] == manifest["outputs"][name].get("sha256")
        for name in OUTPUTS
    )


def _sha256(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def _hash_published(assets_dir: Path) -> dict[str, str | None]:
    """sha256 of what each output name leads to; None unless the name is a link (to a version)."""
    return {
        name: _sha256(assets_dir / name) if (assets_dir / name).is_symlink() else None for name in OUTPUTS
    }


@contextlib.asynccontextmanager
async def _locked(path: Path) -> AsyncIterator[None]:
    """An exclusive flock on path, waited for without blocking the event loop."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(0.1)
        yield
    finally:
        os.close(fd)


async def build_guest_image(assets_dir: Path, cache_dir: Path, *, force: bool = False) -> GuestImage:
    """Build (or verify) the guest image in assets_dir; downloaded packages are kept in cache_dir."""
    for directory in (assets_dir, cache_dir):
        os.makedirs(directory, exist_ok=True)
    async with _locked(cache_dir / ".lock"), _locked(assets_dir / ".build.lock"):
        packages = await resolve_packages(cache_dir)
        files = guest_files()
        inputs = build_inputs(packages, files)
        manifest = read_json(assets_dir / MANIFEST)
        if (
            not force
            and manifest_is_current(manifest, inputs)
            and outputs_intact(manifest, await asyncio.to_thread(_hash_published, assets_dir))
        ):
            log.info("guest image in %s is up to date", assets_dir)
            return GuestImage.in_dir(assets_dir, packages.kernel_version, rebuilt=False)
        await _build(assets_dir, cache_dir, packages, files, inputs)
        return GuestImage.in_dir(assets_dir, packages.kernel_version, rebuilt=True)


async def _build(
    assets_dir: Path,
    cache_dir: Path,
    packages: GuestPackages,
    files: Mapping[str, bytes],
    inputs: Mapping[str, str],
) -> None:
    require_tools(REQUIRED_TOOLS)
    kver = packages.kernel_version
    log.info("building guest image in %s (kernel %s)", assets_dir, kver)
    debs = await download(cache_dir, [packages.kernel, packages.busybox])
    kernel_root = await unpack(cache_dir, debs[0], kernel_version=kver)
    busybox = (await unpack(cache_dir, debs[1])) / "bin" / "busybox"
    applets = (await run(str(busybox), "--list-full")).decode().split()
    moddir = kernel_root / "lib" / "modules" / kver
    index = await asyncio.to_thread(ModuleIndex.load, moddir)
    order = index.load_order(list(MODULES))
    modules = {name: await index.read(moddir, name) for name in order}
    vmlinux = await extract_vmlinux(kernel_root / "boot", kver)

    work = await asyncio.to_thread(_fresh_workdir, assets_dir)
    try:
        agent = await _compile_agent(work, files[AGENT_SOURCE])
        await asyncio.to_thread(_write_trees, work, vmlinux, busybox, applets, modules, files, agent)
        await _mkfs(work / "rootfs.ext4", ROOTFS_SIZE, "vmroot", work / "rootfs")
        await _mkfs(work / "data.ext4", DATA_SIZE, "data")
        outputs = {}
        for name in OUTPUTS:
            sha = await asyncio.to_thread(_sha256, work / name)
            assert sha is not None
            size = (await asyncio.to_thread((work / name).stat)).st_size
            outputs[name] = {"sha256": sha, "size": size, "file": versioned_name(name, sha)}
        manifest = {
            "builder_version": BUILDER_VERSION,
            "kernel_version": kver,
            "inputs": dict(inputs),
            "modules": order,
            "outputs": outputs,
        }
        await asyncio.to_thread(_publish, work, assets_dir, manifest)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    await asyncio.to_thread(prune_cache, cache_dir, debs)


async def _compile_agent(work: Path, source: bytes) -> bytes:
    """The guest agent as a static binary (the guest has no libc of its own)."""
    src = work / "metald-agent.c"
    await asyncio.to_thread(src.write_bytes, source)
    out = work / "metald-agentd"
    await run("gcc", *AGENT_CFLAGS, "-o", str(out), str(src))
    return await asyncio.to_thread(out.read_bytes)


def _fresh_workdir(assets_dir: Path) -> Path:
    """A new scratch dir in assets_dir (same filesystem, for atomic renames); old ones are removed."""
    for stale in assets_dir.glob(".build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=".build-", dir=assets_dir))


def _publish(work: Path, assets_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Add each output as a new version (an existing version is kept as is), point its name at it,
    then replace the manifest: a partial update never looks current, and no file in use changes."""
    for name in OUTPUTS:
        output = manifest["outputs"][name]
        version = assets_dir / output["file"]
        try:
            os.link(work / name, version)  # fails, touching nothing, if that version exists
        except FileExistsError:
            if _sha256(version) != output["sha256"]:
                raise GuestBuildError(f"{version} exists with other content: remove it") from None
        link = work / f"{name}.link"
        link.symlink_to(output["file"])
        os.replace(link, assets_dir / name)
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(work / MANIFEST, assets_dir / MANIFEST)


def _install(path: Path, data: bytes, perm: int | None = None) -> None:
    """Write a file; scripts (#!) are executable unless perm says otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(perm if perm is not None else 0o755 if data.startswith(b"#!") else 0o644)


def _write_trees(
    work: Path,
    vmlinux: bytes,
    busybox_path: Path,
    applets: list[str],
    modules: Mapping[str, bytes],
    files: Mapping[str, bytes],
    agent: bytes,
) -> None:
    busybox = busybox_path.read_bytes()
    _install(work / "vmlinux", vmlinux, 0o644)
    _install(work / "initrd", _initramfs(busybox, applets, modules, files["initramfs/init"]), 0o644)
    _rootfs_tree(work / "rootfs", busybox, applets, files)
    _install(work / "rootfs" / "sbin" / "metald-agentd", agent, 0o755)


def _initramfs(busybox: bytes, applets: list[str], modules: Mapping[str, bytes], init: bytes) -> bytes:
    missing = set(INITRAMFS_APPLETS) - {a.rsplit("/", 1)[-1] for a in applets}
    if missing:
        raise GuestBuildError(f"busybox lacks applets: {', '.join(sorted(missing))}")
    entries = [cpio.directory(d) for d in ("bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys")]
    entries += [cpio.char_device("dev/console", 5, 1), cpio.file("bin/busybox", busybox, 0o755)]
    entries += [cpio.symlink(f"bin/{applet}", "busybox") for applet in INITRAMFS_APPLETS]
    entries += [cpio.file(f"lib/modules/{name}.ko", data) for name, data in modules.items()]
    entries += [
        cpio.file("lib/modules/order", "".join(f"{name}\n" for name in modules).encode()),
        cpio.file("init", init, 0o755),
    ]
    return gzip.compress(cpio.newc_archive(entries), compresslevel=6, mtime=0)


def _rootfs_tree(root: Path, busybox: bytes, applets: list[str], files: Mapping[str, bytes]) -> None:
    for d in ROOTFS_DIRS:
        (root / d).mkdir(mode=0o755, parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "root").chmod(0o700)
    (root / "var" / "run").symlink_to("../run")
    _install(root / "bin" / "busybox", busybox, 0o755)
    for rel, data in files.items():
        if rel.startswith("rootfs/"):
            _install(root / rel.removeprefix("rootfs/"), data)
    for applet in applets:
        link = root / applet
        if not os.path.lexists(link):
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")


async def _mkfs(image: Path, size: str, label: str, source: Path | None = None) -> None:
    """An ext4 image file made without mounting anything, optionally populated from source."""
    populate = ("-d", str(source)) if source is not None else ()
    await run("mkfs.ext4", "-q", "-F", "-L", label, "-E", "root_owner=0:0", *populate, str(image), size)


def build_cli(assets_dir: str, cache_dir: str, force: bool) -> int:
    """`metald image build`: build the guest image, print a short summary, return an exit code."""
    start = time.monotonic()
    try:
        image = asyncio.run(build_guest_image(Path(assets_dir), Path(cache_dir), force=force))
    except GuestBuildError as exc:
        print(f"metald image build: {exc}", file=sys.stderr)
        return 1
    state = "built" if image.rebuilt else "already up to date"
    print(f"guest image {state} in {time.monotonic() - start:.1f}s (kernel {image.kernel_version})")
    for path in (image.vmlinux, image.initrd, image.rootfs, image.data_disk):
        print(f"  {path} -> {os.readlink(path)}  {path.stat().st_size / 2**20:.1f} MiB")
    return 0
