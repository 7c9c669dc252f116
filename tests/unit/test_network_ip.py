"""Command builders aim at the right namespace; "" is the root namespace (production)."""

from __future__ import annotations

import pytest

from metald.domain.errors import ErrorCode, MetaldError
from metald.network import ip


def test_commands_enter_the_namespace_only_when_named() -> None:
    assert ip.ip("", "link", "show") == ("ip", "link", "show")
    assert ip.ip("mdt-x", "link", "show") == ("ip", "-n", "mdt-x", "link", "show")
    assert ip.tc("mdt-x", "qdisc") == ("tc", "-n", "mdt-x", "qdisc")
    assert ip.in_netns("", "nft", "-f", "-") == ("nft", "-f", "-")
    assert ip.in_netns("mdt-x", "nft", "-f", "-") == ("ip", "netns", "exec", "mdt-x", "nft", "-f", "-")
    assert ip.netns_exists("")


async def test_failures_carry_the_command_and_missing_tools_the_package() -> None:
    done = await ip.run("ip", "link", "show", "dev", "no-such-device-x")  # read-only
    assert not done.ok and "no-such-device-x" in done.error().message
    assert done.error().code is ErrorCode.INTERNAL
    with pytest.raises(MetaldError) as info:
        await ip.check("nft-surely-missing-tool")
    assert info.value.code is ErrorCode.UNAVAILABLE and "apt-get install" in info.value.message
