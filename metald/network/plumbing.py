"""Devices of one VM and of one customer bridge, created by converging on what exists.

    guest eth<i> =virtio= tap_<id8>[_i] -br<i>- up<i>  (ns_vm_<id8>)
                  =veth= vh_<id8>[_i] -mb_<n>- gateway addresses  (host namespace)

QEMU runs inside ns_vm_<id8> and opens the TAP there; the small bridge br<i> joins it to the veth
uplink so that each direction has a device whose egress qdisc can shape it (tc.py). Every step
is either idempotent (set master/up, addr/qdisc replace) or guarded by a look at what exists,
so re-running after a crash halfway converges without duplicates.

A warm pool slot's QEMU starts in a holder namespace (ns_held_<slot>) holding only its TAPs, down;
when a clone takes the slot, that namespace becomes the clone's ns_vm_<id8> (adopt_holder) and is
then plumbed like any other.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metald.domain.model import RateLimit, Vm
from metald.network import ip, names, tc, walls

_MS_BIND = 4096
_MARKER = "metald:"  # alias of lo in a VM namespace: which host namespace it belongs to


@dataclass(frozen=True)
class NicLinks:
    index: int
    tap: str
    host_veth: str
    rate_limit: RateLimit | None

    @property
    def bridge(self) -> str:
        return names.vm_bridge(self.index)

    @property
    def uplink(self) -> str:
        return names.vm_uplink(self.index)


def nic_links(vm: Vm) -> list[NicLinks]:
    return [
        NicLinks(i, names.tap_device(vm.vm_id, i), names.host_veth(vm.vm_id, i), nic.rate_limit)
        for i, nic in enumerate(vm.config.network)
    ]


def marker(host_netns: str) -> str:
    return _MARKER + (host_netns or "/")


async def ensure_bridge(
    host_netns: str, bridge: str, addresses: Iterable[str], *, egress: bool = False
) -> bool:
    """The customer bridge, sealed (walls.seal_bridge; forwarding only with egress) and carrying
    addresses ("addr/prefix").

    The bridge goes up last, so "up" marks a finished set-up. Returns True if it was created."""
    shown = await ip.run(*ip.ip(host_netns, "-j", "addr", "show", "dev", bridge))
    created = not shown.ok
    if created:
        await ip.check(*ip.ip(host_netns, "link", "add", bridge, "type", "bridge"))
        info: dict[str, Any] = {}
    else:
        info = ip.parse_list(shown.stdout)[0]
    up = "UP" in info.get("flags", [])
    if not up or egress:  # with egress: also a bridge made before egress was switched on
        await walls.seal_bridge(host_netns, bridge, egress=egress)
    present = {f"{a['local']}/{a['prefixlen']}" for a in info.get("addr_info", [])}
    lines = [
        f"addr replace {a} dev {bridge}" + (" nodad" if ":" in a else "")
        for a in dict.fromkeys(addresses)
        if a not in present
    ]
    await ip.batch(ip.ip(host_netns), lines if up else [*lines, f"link set {bridge} up"])
    return created


async def _own_namespace(host_netns: str, netns: str) -> list[str]:
    """Create `netns` if missing, with no IPv6 stack on its devices (nothing in here for a guest
    to talk to); returns the `ip` lines marking it as made for host_netns (belongs_to)."""
    if not ip.netns_exists(netns):
        await ip.check("ip", "netns", "add", netns)
    await ip.sysctl(netns, {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"})
    return [f"link set lo alias {marker(host_netns)}", "link set lo up"]


async def ensure_vm(host_netns: str, vm_netns: str, bridge: str, nics: Sequence[NicLinks]) -> None:
    vm_lines = await _own_namespace(host_netns, vm_netns)
    present = {str(link["ifname"]) for link in await ip.links(vm_netns)}
    host_lines: list[str] = []
    for nic in nics:
        if nic.uplink not in present:
            # A veth pair lives and dies as a pair, unless an old namespace is still held open.
            await delete_links(host_netns, [nic.host_veth])
            host_lines += [
                f"link add {nic.host_veth} type veth peer name {nic.uplink} netns {vm_netns}",
                f"link set {nic.host_veth} addrgenmode none",
            ]
        host_lines += [f"link set {nic.host_veth} master {bridge}", f"link set {nic.host_veth} up"]
        if nic.tap not in present:
            vm_lines.append(f"tuntap add dev {nic.tap} mode tap")
        if nic.bridge not in present:
            vm_lines.append(f"link add {nic.bridge} type bridge")
        vm_lines += [f"link set {nic.tap} master {nic.bridge}", f"link set {nic.uplink} master {nic.bridge}"]
        vm_lines += [f"link set {dev} up" for dev in (nic.tap, nic.uplink, nic.bridge)]
    await ip.batch(ip.ip(host_netns), host_lines)
    await ip.batch(ip.ip(vm_netns), vm_lines)
    shaping = [
        tc.tbf_command(dev, nic.rate_limit)
        for nic in nics
        if nic.rate_limit is not None and tc.is_limited(nic.rate_limit)
        for dev in (nic.tap, nic.uplink)
    ]
    await ip.batch(ip.tc(vm_netns), shaping)


async def ensure_holder(host_netns: str, netns: str, taps: Sequence[str]) -> None:
    """A namespace holding TAPs for a VMM started before its VM: links down, no address, no
    bridge, so they carry nothing until adopt_holder() gives them to their VM."""
    lines = await _own_namespace(host_netns, netns)  # always a new one: its holder's name is new
    await ip.batch(ip.ip(netns), [*lines, *(f"tuntap add dev {tap} mode tap" for tap in taps)])


async def adopt_holder(holder_netns: str, vm_netns: str, renames: Sequence[tuple[str, str]]) -> bool:
    """The holder's namespace becomes the VM's: its TAPs renamed (held name, VM's name), then the
    namespace mounted under the VM's name as well (the holder's name goes with unhold). Cheaper
    than moving each TAP (a move waits for the kernel's network RCU grace periods, 25-50 ms here),
    and the VMM already in it runs in its VM's namespace, as any VM's does. False if the holder
    is gone, the VM's namespace exists already, or a rename fails."""
    if not ip.netns_exists(holder_netns) or ip.netns_exists(vm_netns):
        return False
    lines = [f"link set {held} name {tap}" for held, tap in renames]
    if not (await ip.run(*ip.ip(holder_netns), "-batch", "-", stdin="\n".join(lines) + "\n")).ok:
        return False
    try:
        await asyncio.to_thread(_mount_netns, ip.NETNS_RUN_DIR / holder_netns, ip.NETNS_RUN_DIR / vm_netns)
    except OSError:
        return False
    return True


def _mount_netns(source: Path, target: Path) -> None:
    """What `ip netns attach` does, from a mounted namespace instead of a pid; blocking."""
    os.close(os.open(target, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
    if ctypes.CDLL(None, use_errno=True).mount(
        os.fsencode(source), os.fsencode(target), None, _MS_BIND, None
    ):
        errno = ctypes.get_errno()
        target.unlink()
        raise OSError(errno, os.strerror(errno), str(target))


async def remove_vm(host_netns: str, vm_netns: str, host_veths: Iterable[str]) -> list[str]:
    """Delete the host-side veths (their VM ends go with them) and the VM namespace (its TAPs and
    bridges go with it). Returns what existed and was removed; whatever is already gone (a host
    reboot, a namespace deleted by hand) counts as removed."""
    removed = await delete_links(host_netns, host_veths)
    if ip.netns_exists(vm_netns):
        done = await ip.run("ip", "netns", "del", vm_netns)
        if done.ok:
            removed.append(vm_netns)
        elif ip.netns_exists(vm_netns):
            raise done.error()
    return removed


async def delete_links(netns: str, devices: Iterable[str]) -> list[str]:
    """Delete devices that exist; returns those deleted. A namespace that does not exist (yet or
    any more) has none to delete."""
    deleted = []
    for device in devices:
        if not ip.netns_exists(netns):
            break
        done = await ip.run(*ip.ip(netns, "link", "del", device))
        if done.ok:
            deleted.append(device)
        elif "Cannot find device" not in done.stderr and ip.netns_exists(netns):
            raise done.error()
    return deleted


async def belongs_to(host_netns: str, vm_netns: str) -> bool:
    """Whether a VM namespace was made by the metald using host_netns (another instance's, e.g.
    another test daemon's, is left alone)."""
    done = await ip.run(*ip.ip(vm_netns, "-j", "link", "show", "lo"))
    return done.ok and any(link.get("ifalias") == marker(host_netns) for link in ip.parse_list(done.stdout))
