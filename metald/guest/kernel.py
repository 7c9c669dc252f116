"""Kernel-side pieces of the guest: the PVH vmlinux inside a bzImage, and module load order."""

from __future__ import annotations

import asyncio
import lzma
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from metald.guest.proc import GuestBuildError, require_tools, run

# Magic numbers of the compressed payload of a bzImage.
_PAYLOAD_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"\xfd7zXZ\x00": "xz",
    b"\x02\x21\x4c\x18": "lz4",
    b"\x28\xb5\x2f\xfd": "zstd",
}
# Formats Python cannot decompress by itself: (command, Debian package).
_DECOMPRESSORS = {"lz4": (("lz4", "-dc"), "lz4"), "zstd": (("zstd", "-qdc"), "zstd")}
_MODULE_SUFFIX = re.compile(r"\.ko(?:\.(gz|xz|zst))?$")
_MODULE_FORMATS = {"gz": "gzip", "xz": "xz", "zst": "zstd"}
_ELF_MAGIC = b"\x7fELF"


def bzimage_payload(image: bytes) -> tuple[str, bytes]:
    """Return (format, compressed vmlinux) from a bzImage, using the x86 boot protocol header."""
    if image[0x202:0x206] != b"HdrS":
        raise GuestBuildError("kernel image is not a bzImage (no HdrS boot header)")
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = image[start : start + length]
    fmt = next((f for magic, f in _PAYLOAD_MAGIC.items() if payload.startswith(magic)), None)
    if fmt is None:
        raise GuestBuildError(f"unknown kernel compression (magic {payload[:6].hex()})")
    # Every format but gzip is followed by the uncompressed size (kbuild's size_append).
    return fmt, payload if fmt == "gzip" else payload[:-4]


async def decompress(data: bytes, fmt: str) -> bytes:
    """Decompress one stream, ignoring trailing bytes after it."""
    if fmt == "gzip":
        return await asyncio.to_thread(zlib.decompressobj(wbits=31).decompress, data)
    if fmt == "xz":
        return await asyncio.to_thread(lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress, data)
    argv, package = _DECOMPRESSORS[fmt]
    require_tools({argv[0]: package})
    return await run(*argv, stdin=data)


def _read_bzimage(boot: Path, kernel_version: str) -> bytes:
    config = (boot / f"config-{kernel_version}").read_text()
    if "CONFIG_PVH=y" not in config.splitlines():
        raise GuestBuildError(f"kernel {kernel_version} lacks CONFIG_PVH: cannot boot it as an ELF")
    return (boot / f"vmlinuz-{kernel_version}").read_bytes()


async def extract_vmlinux(boot: Path, kernel_version: str) -> bytes:
    """The uncompressed ELF kernel inside boot/vmlinuz-VERSION, bootable through its PVH entry."""
    fmt, payload = bzimage_payload(await asyncio.to_thread(_read_bzimage, boot, kernel_version))
    elf = await decompress(payload, fmt)
    if not elf.startswith(_ELF_MAGIC):
        raise GuestBuildError(f"kernel {kernel_version}: decompressed {fmt} payload is not an ELF file")
    return elf


def module_name(path: str) -> str:
    """kernel/drivers/net/virtio_net.ko.xz -> virtio_net (dashes normalised like modprobe)."""
    return _MODULE_SUFFIX.sub("", path.rsplit("/", 1)[-1]).replace("-", "_")


@dataclass
class ModuleIndex:
    """What depmod knows about a kernel's modules."""

    paths: dict[str, str] = field(default_factory=dict)  # name -> path relative to the modules dir
    deps: dict[str, list[str]] = field(default_factory=dict)  # name -> names it needs
    builtin: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, modules_dep: str, modules_builtin: str) -> ModuleIndex:
        index = cls(builtin={module_name(line) for line in modules_builtin.split()})
        for line in modules_dep.splitlines():
            path, sep, deps = line.partition(":")
            if sep:
                name = module_name(path)
                index.paths[name] = path
                index.deps[name] = [module_name(d) for d in deps.split()]
        return index

    @classmethod
    def load(cls, moddir: Path) -> ModuleIndex:
        return cls.parse((moddir / "modules.dep").read_text(), (moddir / "modules.builtin").read_text())

    def load_order(self, wanted: list[str]) -> list[str]:
        """Loadable modules for wanted, dependencies first; built-in ones are skipped."""
        order: list[str] = []

        def visit(name: str, chain: tuple[str, ...]) -> None:
            if name in order or name in self.builtin:
                return
            if name not in self.paths:
                needed_by = f" (needed by {chain[-1]})" if chain else ""
                raise GuestBuildError(f"kernel has module {name} neither built in nor loadable{needed_by}")
            if name in chain:
                raise GuestBuildError(f"module dependency cycle: {' > '.join((*chain, name))}")
            for dep in self.deps[name]:
                visit(dep, (*chain, name))
            order.append(name)

        for name in wanted:
            visit(name, ())
        return order

    async def read(self, moddir: Path, name: str) -> bytes:
        """The plain ELF .ko of a module (busybox insmod cannot load compressed ones)."""
        path = self.paths[name]
        data = (moddir / path).read_bytes()
        suffix = _MODULE_SUFFIX.search(path)
        ext = suffix.group(1) if suffix else None
        return await decompress(data, _MODULE_FORMATS[ext]) if ext else data
