"""Tenant walls in the host namespace: what guests may reach besides their own bridge.

- Each customer has its own bridge, so different customers share no L2 segment.
- Nothing is routed between bridges: forwarding is off in metald's own host namespace, and the
  nftables table `inet metald` drops forwarded traffic from/to customer bridges in any namespace
  (the root namespace keeps whatever ip_forward the operator set). The bridge netfilter hook
  (br_netfilter, on by default in new namespaces here) also shows *bridged* frames to the forward
  hook with in = out = the bridge, so those same-bridge pairs are accepted first.
- A guest may reach only the addresses of its own bridge (its gateways): `fib daddr . iif` drops
  traffic to every other local address (other customers' gateways, loopback, the host's own
  addresses), and the API port is dropped even on the gateway address.

The table is rewritten whole in one nft transaction, never appended to, so re-applying converges.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from metald.network import ip
from metald.network.names import CUSTOMER_BRIDGE_PREFIX

TABLE = "metald"


@dataclass(frozen=True)
class EgressWalls:
    """The way out (egress.py): the uplink, what no policy opens, and each VM's open rules."""

    uplink: str
    denied: tuple[str, ...]
    allowed: tuple[str, ...]


def ruleset(
    bridges: Iterable[str], blocked_ports: Iterable[int] = (), egress: EgressWalls | None = None
) -> str:
    """The complete `inet metald` table as an atomic nft script (create, delete, recreate)."""
    guests = f'"{CUSTOMER_BRIDGE_PREFIX}*"'
    same_bridge = ", ".join(f'"{b}" . "{b}"' for b in sorted(set(bridges)))
    ports = ", ".join(str(p) for p in sorted(set(blocked_ports)))
    from_guests = ["fib daddr . iif type != { local, broadcast, multicast } drop"]
    if ports:
        from_guests += [f"tcp dport {{ {ports} }} drop", f"udp dport {{ {ports} }} drop"]
    forward = [f"iifname . oifname {{ {same_bridge} }} accept"] if same_bridge else []
    if egress is not None:
        uplink = f'"{egress.uplink}"'
        forward += [
            f"iifname {uplink} oifname {guests} ct state established,related accept",
            f"iifname {guests} oifname {uplink} jump egress",
        ]
    forward += [f"iifname {guests} drop", f"oifname {guests} drop"]
    return "\n".join(
        [
            f"table inet {TABLE}",
            f"delete table inet {TABLE}",
            f"table inet {TABLE} {{",
            "  chain input {",
            "    type filter hook input priority filter; policy accept;",
            f"    iifname {guests} jump from_guests",
            "  }",
            "  chain from_guests {",
            *(f"    {rule}" for rule in from_guests),
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            *(f"    {rule}" for rule in forward),
            "  }",
            *(_egress_chains(egress, guests) if egress is not None else []),
            "}",
            "",
        ]
    )


def _egress_chains(egress: EgressWalls, guests: str) -> list[str]:
    return [
        "  chain egress {",
        *(f"    {rule}" for rule in (*egress.denied, *egress.allowed)),
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    iifname {guests} oifname "{egress.uplink}" masquerade',
        "  }",
    ]


async def apply(netns: str, script: str) -> None:
    """Install a ruleset() script."""
    await ip.check(*ip.in_netns(netns, "nft", "-f", "-"), stdin=script)


def rule_count(script: str) -> int:
    """Rules a script from ruleset() puts in the table (to tell a tampered table from ours)."""
    inside, count = False, 0
    for line in script.splitlines():
        text = line.strip()
        if text.startswith("chain "):
            inside = True
        elif text == "}":
            inside = False
        elif inside and text and not text.startswith("type "):
            count += 1
    return count


async def installed_rules(netns: str) -> int | None:
    """Rules in the namespace's `inet metald` table now; None if the table (or netns) is gone."""
    done = await ip.run(*ip.in_netns(netns, "nft", "-j", "list", "table", "inet", TABLE))
    if not done.ok:
        return None
    items = json.loads(done.stdout).get("nftables", [])
    return sum(1 for item in items if "rule" in item)


async def seal_own_namespace(netns: str, *, egress: bool = False) -> None:
    """Sysctls for a host namespace metald owns: a dead end, not a router (unless egress is
    offered: then it routes, and the forward chain decides what)."""
    forwarding = "1" if egress else "0"
    await ip.sysctl(
        netns,
        {
            "net.ipv4.ip_forward": forwarding,
            "net.ipv6.conf.all.forwarding": forwarding,
            "net.ipv6.conf.default.accept_ra": "0",
        },
    )


async def seal_bridge(netns: str, bridge: str, *, egress: bool = False) -> None:
    """Per-bridge sysctls, safe in the root namespace too: no routing in from the bridge (unless
    egress is offered), no RAs accepted from guests, ARP answered only for the bridge's own addresses."""
    await ip.sysctl(
        netns,
        {
            f"net.ipv4.conf.{bridge}.forwarding": "1" if egress else "0",
            f"net.ipv4.conf.{bridge}.arp_ignore": "1",
            f"net.ipv6.conf.{bridge}.accept_ra": "0",
        },
    )
