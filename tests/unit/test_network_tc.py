"""Token-bucket parameters and the nftables walls, as text."""

from __future__ import annotations

import pytest

from metald.domain.model import RateLimit
from metald.network import tc, walls


@pytest.mark.parametrize(
    ("limit", "bucket"),
    [
        (RateLimit(1_000_000, 0, 0), 3028),  # floor: two full frames
        (RateLimit(1_000_000, 0, 100), 100_000),  # one refill period
        (RateLimit(1_000_000, 500_000, 100), 500_000),  # explicit burst wins when larger
        (RateLimit(104_857_600, 1_048_576, 100), 10_485_760),
        (RateLimit(100, 10, 5), 3028),
    ],
)
def test_bucket_is_the_largest_of_burst_refill_and_two_frames(limit: RateLimit, bucket: int) -> None:
    assert tc.bucket_bytes(limit) == bucket


def test_tbf_command_in_bits_per_second() -> None:
    line = tc.tbf_command("tap_1", RateLimit(1_000_000, 0, 100))
    assert line == "qdisc replace dev tap_1 root tbf rate 8000000bit burst 100000 latency 50ms"


def test_zero_bandwidth_means_unlimited() -> None:
    assert not tc.is_limited(None)
    assert not tc.is_limited(RateLimit(0, 1000, 100))
    assert tc.is_limited(RateLimit(1, 0, 0))


def test_walls_ruleset_replaces_the_table_atomically() -> None:
    text = walls.ruleset(["mb_2", "mb_1", "mb_1"], [8080])
    lines = text.splitlines()
    # create-if-missing, delete, recreate: one transaction, never an append
    assert lines[:3] == ["table inet metald", "delete table inet metald", "table inet metald {"]
    assert 'iifname . oifname { "mb_1" . "mb_1", "mb_2" . "mb_2" } accept' in text
    assert "fib daddr . iif type != { local, broadcast, multicast } drop" in text
    assert "tcp dport { 8080 } drop" in text
    assert text.index(". oifname") < text.index('iifname "mb_*" drop')
    assert walls.ruleset(["mb_1", "mb_2"], [8080]) == walls.ruleset(["mb_2", "mb_1"], [8080])


def test_walls_without_bridges_or_ports_still_drop_forwarding() -> None:
    text = walls.ruleset([])
    assert "oifname" not in text.split('iifname "mb_*" drop')[0].split("chain forward")[1]
    assert "dport" not in text
    assert 'oifname "mb_*" drop' in text
