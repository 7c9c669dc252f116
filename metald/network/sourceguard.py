"""Source guard in a VM's namespace: frames from the guest carry its own MAC and addresses.

Egress rules (egress.py) open destinations per guest source address, so on a host that offers
egress a guest must not send as a sibling VM of the same customer. A `bridge` family table in the
VM's own namespace (the frames from the TAP cross its small bridge br<i>) drops anything from the
TAP with another source MAC, another IPv4 source (ARP included), or an IPv6 source other than the
guest's address, link-local or unspecified (neighbour discovery, DAD).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from metald.network import ip

TABLE = "metald_guard"


@dataclass(frozen=True)
class GuestSource:
    tap: str
    mac: str
    ipv4: str  # bare address or ""
    ipv6: str


def ruleset(sources: Sequence[GuestSource]) -> str:
    rules: list[str] = []
    for s in sources:
        tap = f'iifname "{s.tap}"'
        rules.append(f"{tap} ether saddr != {s.mac} drop")
        if s.ipv4:
            rules += [f"{tap} ip saddr != {s.ipv4} drop", f"{tap} arp saddr ip != {s.ipv4} drop"]
        else:
            rules.append(f"{tap} ether type {{ ip, arp }} drop")
        own6 = f"{s.ipv6}, " if s.ipv6 else ""
        rules.append(f"{tap} ip6 saddr != {{ {own6}fe80::/10, :: }} drop")
    return "\n".join(
        [
            f"table bridge {TABLE}",
            f"delete table bridge {TABLE}",
            f"table bridge {TABLE} {{",
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            *(f"    {rule}" for rule in rules),
            "  }",
            "}",
            "",
        ]
    )


async def apply(vm_netns: str, sources: Sequence[GuestSource]) -> None:
    await ip.check(*ip.in_netns(vm_netns, "nft", "-f", "-"), stdin=ruleset(sources))
