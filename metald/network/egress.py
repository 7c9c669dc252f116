"""Egress policies: the destinations beyond its customer network a guest may reach (issue 15).

Default deny. Each `egress.allow` entry of an interface opens one destination network, optionally
narrowed to a protocol and ports, for that interface's guest addresses only. Allowed traffic is
routed from the customer's bridge out of the uplink named by `network_egress_uplink` (an interface
in metald's host namespace) and masqueraded behind the uplink's address; replies come back as
conntrack-established traffic. What no policy can open (walls.py puts these first): other
customers' bridges, the host's own addresses, the uplink's own network (the host side of the
uplink), loopback, link-local (cloud metadata), multicast, and the API port on any address.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

from metald.domain.errors import invalid, precondition
from metald.domain.model import EgressRule, NetworkInterface, NicAddress

PROTOCOLS = ("", "tcp", "udp", "icmp")
_TAG = "metald-vm:"
_TAGGED = re.compile(r'comment "metald-vm:([0-9a-f]{8})"\s*$')
MAX_RULES = 64  # per interface
MAX_PORTS = 64  # per rule
# Never egress destinations, whatever a policy says.
ALWAYS_DENIED = (
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/3",
    "::/127",
    "::ffff:0:0/96",
    "fe80::/10",
    "ff00::/8",
)


def has_policy(nic: NetworkInterface) -> bool:
    return nic.egress is not None and bool(nic.egress.allow)


def check_policies(nics: Sequence[NetworkInterface], *, available: bool) -> None:
    """INVALID_ARGUMENT naming the field for a malformed policy; FAILED_PRECONDITION if this host
    offers no egress at all."""
    for i, nic in enumerate(nics):
        if nic.egress is None:
            continue
        field = f"config.network[{i}].egress.allow"
        if len(nic.egress.allow) > MAX_RULES:
            raise invalid(field, f"at most {MAX_RULES} entries")
        for j, rule in enumerate(nic.egress.allow):
            _check_rule(rule, f"{field}[{j}]")
        if nic.egress.allow and not available:
            raise precondition(
                "NETWORK_EGRESS_UNAVAILABLE",
                f"{field}: this host offers no egress (network_allow_egress is off or no uplink is set)",
                field=field,
            )


def _check_rule(rule: EgressRule, field: str) -> None:
    try:
        ipaddress.ip_network(rule.cidr, strict=True)
    except ValueError as exc:
        raise invalid(f"{field}.cidr", f"{rule.cidr!r} is not a network address/prefix: {exc}") from exc
    if rule.protocol not in PROTOCOLS:
        raise invalid(f"{field}.protocol", f"{rule.protocol!r} is not one of tcp, udp, icmp or empty (any)")
    if len(rule.ports) > MAX_PORTS:
        raise invalid(f"{field}.ports", f"at most {MAX_PORTS} ports")
    for port in rule.ports:
        if not 1 <= port <= 65535:
            raise invalid(f"{field}.ports", f"{port} is not a port (1-65535)")
    if rule.ports and rule.protocol == "icmp":
        raise invalid(f"{field}.ports", "icmp has no ports")


def vm_rules(
    vm_tag: str, bridge: str, nics: Sequence[NetworkInterface], addresses: Sequence[NicAddress]
) -> list[str]:
    """nft rules (for walls' egress chain) opening each interface's policy for its own addresses,
    each commented with vm_tag so that a restarted daemon can take them over (tagged_rules)."""
    lines: list[str] = []
    for nic, address in zip(nics, addresses, strict=True):
        if nic.egress is None:
            continue
        sources = [a.split("/")[0] for a in (address.guest_ipv4, address.guest_ipv6) if a]
        lines += [line for rule in nic.egress.allow for line in _rule_lines(bridge, sources, rule)]
    return [f'{line} comment "{_TAG}{vm_tag}"' for line in lines]


def tagged_rules(listing: str) -> dict[str, list[str]]:
    """vm_tag -> its rules, from `nft list chain` output (which nft reads back as it writes it)."""
    found: dict[str, list[str]] = {}
    for line in listing.splitlines():
        match = _TAGGED.search(line)
        if match:
            found.setdefault(match.group(1), []).append(line.strip())
    return found


def _rule_lines(bridge: str, sources: Iterable[str], rule: EgressRule) -> list[str]:
    network = ipaddress.ip_network(rule.cidr)
    family = "ip" if network.version == 4 else "ip6"
    match rule.protocol, bool(rule.ports):
        case "", False:
            what = ""
        case "", True:
            what = f" meta l4proto {{ tcp, udp }} th dport {{ {_ports(rule.ports)} }}"
        case "icmp", _:
            what = " meta l4proto icmp" if network.version == 4 else " meta l4proto ipv6-icmp"
        case protocol, True:
            what = f" {protocol} dport {{ {_ports(rule.ports)} }}"
        case protocol, False:
            what = f" meta l4proto {protocol}"
    return [
        f'iifname "{bridge}" {family} saddr {source} {family} daddr {network}{what} accept'
        for source in sources
        if ipaddress.ip_address(source).version == network.version
    ]


def _ports(ports: Iterable[int]) -> str:
    return ", ".join(str(p) for p in sorted(set(ports)))


def denied_lines(uplink_networks: Iterable[str], blocked_ports: Iterable[int]) -> list[str]:
    """The head of the egress chain: what no policy opens (see the module docstring)."""
    denied = [ipaddress.ip_network(n, strict=False) for n in (*ALWAYS_DENIED, *uplink_networks)]
    v4 = ipaddress.collapse_addresses(n for n in denied if isinstance(n, ipaddress.IPv4Network))
    v6 = ipaddress.collapse_addresses(n for n in denied if isinstance(n, ipaddress.IPv6Network))
    lines = [
        f"ip daddr {{ {', '.join(map(str, v4))} }} drop",
        f"ip6 daddr {{ {', '.join(map(str, v6))} }} drop",
    ]
    ports = _ports(blocked_ports)
    if ports:
        lines.append(f"meta l4proto {{ tcp, udp }} th dport {{ {ports} }} drop")
    return lines
