"""Which Debian packages the guest is built from, and fetching/unpacking them into a cache."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from metald.guest.proc import GuestBuildError, run

APT_LISTS = Path("/var/lib/apt/lists")
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"

# linux-image-6.1.0-56-cloud-amd64-unsigned: plain ELF modules, no signing shim.
_UNSIGNED = re.compile(r"^linux-image-(?P<kver>(?P<num>\d+\.\d+\.\d+-\d+)-cloud-amd64)-unsigned$")
_META_DEP = re.compile(r"linux-image-(?P<kver>\d+\.\d+\.\d+-\d+-cloud-amd64) \(= (?P<ver>[^)\s]+)\)")
_DEB = re.compile(r"^(?P<name>[a-z0-9][a-z0-9+.-]*)_(?P<ver>[^_]+)_[a-z0-9]+\.deb$")


@dataclass(frozen=True)
class Package:
    """An exact Debian package version."""

    name: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}"

    @property
    def deb_glob(self) -> str:
        """Glob for the file `apt-get download` writes (':' of an epoch becomes %3a)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_*.deb"


@dataclass(frozen=True)
class GuestPackages:
    """The kernel and busybox packages of one guest image."""

    kernel_version: str  # uname -r, e.g. 6.1.0-56-cloud-amd64
    kernel: Package
    busybox: Package


def parse_show(text: str) -> dict[str, dict[str, str]]:
    """Parse `apt-cache show` output into {package: fields} (first stanza of each package wins)."""
    stanzas: dict[str, dict[str, str]] = {}
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep and not line[0].isspace():
                fields[key] = value.strip()
        if "Package" in fields:
            stanzas.setdefault(fields["Package"], fields)
    return stanzas


def kernel_from_meta(stanzas: dict[str, dict[str, str]]) -> Package | None:
    """The unsigned image the cloud metapackage currently points at, e.g. 6.1.0-56 at 6.1.192-2."""
    match = _META_DEP.search(stanzas.get(KERNEL_META, {}).get("Depends", ""))
    if match is None:
        return None
    return Package(f"linux-image-{match['kver']}-unsigned", match["ver"])


def _abi_key(kver_num: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.split(r"[.-]", kver_num))


def newest_unsigned(names: Iterable[str]) -> str | None:
    """The newest linux-image-X.Y.Z-N-cloud-amd64-unsigned package name among names."""
    found = [m for m in map(_UNSIGNED.match, names) if m]
    return max(found, key=lambda m: _abi_key(m["num"])).string if found else None


def kernel_version_of(package: str) -> str:
    match = _UNSIGNED.match(package)
    if match is None:
        raise GuestBuildError(f"not a cloud kernel image package: {package}")
    return match["kver"]


def packages_from_debs(filenames: Iterable[str]) -> GuestPackages | None:
    """Offline fallback: the newest kernel and busybox .debs already in the cache."""
    debs = [(m["name"], m["ver"].replace("%3a", ":")) for m in map(_DEB.match, filenames) if m]
    kernel_name = newest_unsigned(name for name, _ in debs)
    busybox = next((Package(n, v) for n, v in sorted(debs, reverse=True) if n == BUSYBOX), None)
    if kernel_name is None or busybox is None:
        return None
    kernel_ver = next(v for n, v in debs if n == kernel_name)
    return GuestPackages(kernel_version_of(kernel_name), Package(kernel_name, kernel_ver), busybox)


async def _show(*names: str) -> dict[str, dict[str, str]]:
    return parse_show((await run("apt-cache", "show", "--no-all-versions", *names)).decode())


async def _query_apt() -> GuestPackages:
    """The kernel the cloud metapackage depends on (else the newest unsigned cloud kernel apt
    knows) and the candidate busybox-static."""
    stanzas = await _show(KERNEL_META, BUSYBOX)
    kernel = kernel_from_meta(stanzas)
    if kernel is None:
        names = (await run("apt-cache", "pkgnames", "linux-image-")).decode().split()
        name = newest_unsigned(names)
        version = (await _show(name)).get(name, {}).get("Version") if name else None
        if name is None or version is None:
            raise GuestBuildError("apt knows no linux-image-*-cloud-amd64-unsigned package")
        kernel = Package(name, version)
    if BUSYBOX not in stanzas:
        raise GuestBuildError(f"apt knows no {BUSYBOX} package")
    return GuestPackages(
        kernel_version_of(kernel.name), kernel, Package(BUSYBOX, stanzas[BUSYBOX]["Version"])
    )


def apt_lists_stamp() -> str:
    """Changes whenever `apt-get update` changes the package lists (apt-cache is slow to ask)."""
    try:
        entries = [APT_LISTS, *APT_LISTS.iterdir()]
        return str(max(p.stat().st_mtime_ns for p in entries))
    except OSError:
        return ""


def _load_memo(memo: Path, stamp: str) -> GuestPackages | None:
    try:
        data = json.loads(memo.read_text())
        if data["apt_lists"] != stamp:
            return None
        return GuestPackages(data["kernel_version"], Package(*data["kernel"]), Package(*data["busybox"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_memo(memo: Path, stamp: str, packages: GuestPackages) -> None:
    data = {
        "apt_lists": stamp,
        "kernel_version": packages.kernel_version,
        "kernel": [packages.kernel.name, packages.kernel.version],
        "busybox": [packages.busybox.name, packages.busybox.version],
    }
    memo.write_text(json.dumps(data) + "\n")


async def resolve_packages(cache_dir: Path) -> GuestPackages:
    """Pick the packages with apt (remembered until the apt lists change); offline, the newest
    .debs in cache_dir."""
    stamp = await asyncio.to_thread(apt_lists_stamp)
    memo = cache_dir / "resolved.json"
    if stamp and (known := await asyncio.to_thread(_load_memo, memo, stamp)):
        return known
    try:
        packages = await _query_apt()
    except GuestBuildError as exc:
        cached = packages_from_debs(os.listdir(cache_dir))
        if cached is None:
            raise GuestBuildError(f"{exc} (run apt-get update first?)") from exc
        return cached
    if stamp:
        await asyncio.to_thread(_save_memo, memo, stamp, packages)
    return packages


def cached_deb(cache_dir: Path, package: Package) -> Path | None:
    return next(iter(sorted(cache_dir.glob(package.deb_glob))), None)


async def download(cache_dir: Path, packages: list[Package]) -> list[Path]:
    """Return the .deb of each package, fetching the missing ones with `apt-get download`."""
    missing = [p for p in packages if cached_deb(cache_dir, p) is None]
    if missing:
        # Download into a scratch dir so an interrupted fetch never leaves a truncated .deb behind.
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
            await run("apt-get", "download", *(p.spec for p in missing), cwd=Path(tmp))
            _move_debs(Path(tmp), cache_dir)
    debs = [cached_deb(cache_dir, p) for p in packages]
    lost = [p.spec for p, deb in zip(packages, debs, strict=True) if deb is None]
    if lost:
        raise GuestBuildError(f"apt-get download did not produce: {', '.join(lost)}")
    return [deb for deb in debs if deb is not None]


def _move_debs(src: Path, dest: Path) -> None:
    for deb in src.glob("*.deb"):
        deb.replace(dest / deb.name)


async def unpack(cache_dir: Path, deb: Path, kernel_version: str | None = None) -> Path:
    """Unpack deb once into cache_dir/unpacked/<stem> (running depmod for a kernel); reuse after."""
    dest = cache_dir / "unpacked" / deb.stem
    if await asyncio.to_thread(dest.is_dir):
        return dest
    os.makedirs(dest.parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent)
    try:
        await run("dpkg-deb", "-x", str(deb), tmp)
        if kernel_version is not None:
            await run("depmod", "-b", tmp, kernel_version)
        os.rename(tmp, dest)
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)
    return dest


def prune_cache(cache_dir: Path, keep: list[Path]) -> None:
    """Delete kernel/busybox .debs and unpacked trees of other versions than keep."""
    names = {p.name for p in keep} | {p.stem for p in keep}
    stale = [
        *(p for p in cache_dir.glob("*.deb") if p.name not in names and _DEB.match(p.name)),
        *(p for p in (cache_dir / "unpacked").glob("*") if p.name not in names),
        *cache_dir.glob(".download-*"),
    ]
    for path in stale:
        if not path.name.startswith(("linux-image-", f"{BUSYBOX}_", ".tmp-", ".download-")):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
