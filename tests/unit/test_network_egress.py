"""Egress policies: validation (INVALID_ARGUMENT naming the field) and the nft rules they become."""

from __future__ import annotations

import pytest

from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.model import EgressPolicy, EgressRule, NetworkInterface, NicAddress
from metald.network import egress, sourceguard, walls


def nic(*rules: EgressRule) -> NetworkInterface:
    return NetworkInterface("eth0", egress=EgressPolicy(tuple(rules)))


@pytest.mark.parametrize(
    ("rule", "field", "text"),
    [
        (EgressRule("300.1.2.0/24"), "config.network[1].egress.allow[0].cidr", "not a network"),
        (EgressRule("10.1.2.3/24"), "config.network[1].egress.allow[0].cidr", "host bits"),
        (EgressRule("example.com"), "config.network[1].egress.allow[0].cidr", "not a network"),
        (EgressRule("10.0.0.0/8", (0,)), "config.network[1].egress.allow[0].ports", "0 is not a port"),
        (EgressRule("10.0.0.0/8", (65536,)), "config.network[1].egress.allow[0].ports", "65536"),
        (EgressRule("10.0.0.0/8", (), "sctp"), "config.network[1].egress.allow[0].protocol", "sctp"),
        (EgressRule("10.0.0.0/8", (), "TCP"), "config.network[1].egress.allow[0].protocol", "TCP"),
        (EgressRule("10.0.0.0/8", (8,), "icmp"), "config.network[1].egress.allow[0].ports", "no ports"),
        (
            EgressRule("10.0.0.0/8", tuple(range(1, 66)), "tcp"),
            "config.network[1].egress.allow[0].ports",
            "64",
        ),
    ],
)
def test_bad_rules_are_refused_naming_the_field(rule: EgressRule, field: str, text: str) -> None:
    with pytest.raises(MetaldError) as info:
        egress.check_policies([NetworkInterface("eth0"), nic(rule)], available=True)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert info.value.metadata["field"] == field and text in info.value.message


def test_too_many_rules_and_a_host_without_egress() -> None:
    with pytest.raises(MetaldError) as info:
        egress.check_policies([nic(*[EgressRule("10.0.0.0/8")] * 65)], available=True)
    assert info.value.metadata["field"] == "config.network[0].egress.allow"
    with pytest.raises(MetaldError) as info:
        egress.check_policies([nic(EgressRule("10.0.0.0/8"))], available=False)
    assert (
        info.value.code is ErrorCode.FAILED_PRECONDITION and info.value.reason == "NETWORK_EGRESS_UNAVAILABLE"
    )
    # No policy, or an empty one, is fine everywhere: default deny.
    egress.check_policies([NetworkInterface("eth0"), nic()], available=False)


def test_rules_are_per_source_address_and_family() -> None:
    address = NicAddress("eth0", "02:00:00:00:00:01", "10.240.3.2/24", "10.240.3.1", "fd00::2/64", "fd00::1")
    rules = egress.vm_rules(
        "0a1b2c3d",
        "mb_3",
        [
            nic(
                EgressRule("203.0.113.10/32", (8080, 80, 80), "tcp"),
                EgressRule("198.51.100.0/24"),
                EgressRule("2001:db8::/32", (53,), ""),
                EgressRule("192.0.2.0/24", (), "icmp"),
                EgressRule("2001:db8::/32", (), "icmp"),
                EgressRule("192.0.2.0/24", (), "udp"),
            )
        ],
        [address],
    )
    assert all(r.endswith(' comment "metald-vm:0a1b2c3d"') for r in rules)
    assert [r.removesuffix(' comment "metald-vm:0a1b2c3d"') for r in rules] == [
        'iifname "mb_3" ip saddr 10.240.3.2 ip daddr 203.0.113.10/32 tcp dport { 80, 8080 } accept',
        'iifname "mb_3" ip saddr 10.240.3.2 ip daddr 198.51.100.0/24 accept',
        'iifname "mb_3" ip6 saddr fd00::2 ip6 daddr 2001:db8::/32 meta l4proto { tcp, udp } th dport { 53 } accept',
        'iifname "mb_3" ip saddr 10.240.3.2 ip daddr 192.0.2.0/24 meta l4proto icmp accept',
        'iifname "mb_3" ip6 saddr fd00::2 ip6 daddr 2001:db8::/32 meta l4proto ipv6-icmp accept',
        'iifname "mb_3" ip saddr 10.240.3.2 ip daddr 192.0.2.0/24 meta l4proto udp accept',
    ]
    assert egress.vm_rules("0a1b2c3d", "mb_3", [NetworkInterface("eth0")], [address]) == []


def test_a_restarted_daemon_finds_each_vms_rules_by_tag() -> None:
    listing = """table inet metald {
	chain egress {
		ip daddr { 0.0.0.0/8, 127.0.0.0/8 } drop
		iifname "mb_3" ip saddr 10.240.3.2 ip daddr 203.0.113.10 tcp dport 8080 accept comment "metald-vm:0a1b2c3d"
		iifname "mb_3" ip saddr 10.240.3.3 ip daddr 203.0.113.0/24 accept comment "metald-vm:99999999"
		iifname "mb_3" ip saddr 10.240.3.2 meta l4proto icmp accept comment "metald-vm:0a1b2c3d"
	}
}"""
    found = egress.tagged_rules(listing)
    assert sorted(found) == ["0a1b2c3d", "99999999"]
    assert (
        found["0a1b2c3d"][1]
        == 'iifname "mb_3" ip saddr 10.240.3.2 meta l4proto icmp accept comment "metald-vm:0a1b2c3d"'
    )


def test_what_no_policy_opens_comes_first() -> None:
    denied = egress.denied_lines(["198.18.0.2/24", "127.0.0.5/8"], [8080])
    assert denied[0].startswith(
        "ip daddr { 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 198.18.0.0/24, 224.0.0.0/3 }"
    )
    assert "fe80::/10" in denied[1] and denied[2] == "meta l4proto { tcp, udp } th dport { 8080 } drop"
    script = walls.ruleset(["mb_1"], [8080], walls.EgressWalls("up-out", tuple(denied), ("RULE accept",)))
    forward = script[script.index("chain forward") : script.index("chain egress")]
    assert (
        forward.index('"mb_1" . "mb_1"') < forward.index("jump egress") < forward.index('iifname "mb_*" drop')
    )
    assert 'iifname "up-out" oifname "mb_*" ct state established,related accept' in forward
    chain = script[script.index("chain egress") : script.index("chain postrouting")]
    assert chain.index("8080 } drop") < chain.index("RULE accept")
    assert 'iifname "mb_*" oifname "up-out" masquerade' in script
    assert walls.rule_count(script) == walls.rule_count(walls.ruleset(["mb_1"], [8080])) + 2 + 4 + 1


def test_source_guard_pins_mac_and_addresses_per_tap() -> None:
    script = sourceguard.ruleset(
        [
            sourceguard.GuestSource("tap_1", "02:00:00:00:00:01", "10.240.3.2", "fd00::2"),
            sourceguard.GuestSource("tap_1_1", "02:00:00:00:00:02", "", ""),
        ]
    )
    assert script.startswith("table bridge metald_guard\ndelete table bridge metald_guard\n")
    assert 'iifname "tap_1" ether saddr != 02:00:00:00:00:01 drop' in script
    assert 'iifname "tap_1" arp saddr ip != 10.240.3.2 drop' in script
    assert 'iifname "tap_1" ip6 saddr != { fd00::2, fe80::/10, :: } drop' in script
    assert 'iifname "tap_1_1" ether type { ip, arp } drop' in script  # no IPv4: none sent
