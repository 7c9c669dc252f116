"""Pure parts of the fleet: gateway tokens and the placement choice."""

from __future__ import annotations

import pytest

from metald.api.auth import FleetHostAuthenticator, Peer
from metald.domain.errors import MetaldError
from metald.fleet.inventory import HostCapacity
from metald.fleet.placement import Candidate, choose
from metald.fleet.tokens import GatewayTokens, InvalidGatewayToken

SECRET = b"s" * 32
NOW = 1_800_000_000.0


def test_a_token_names_its_customer_only_for_its_host_and_only_briefly() -> None:
    tokens = GatewayTokens(SECRET)
    token = tokens.mint("acme", "host1", now=NOW)
    assert tokens.verify(token, "host1", now=NOW + 10) == "acme"
    with pytest.raises(InvalidGatewayToken):
        tokens.verify(token, "host2", now=NOW)
    with pytest.raises(InvalidGatewayToken):
        tokens.verify(token, "host1", now=NOW + 600)
    with pytest.raises(InvalidGatewayToken):
        GatewayTokens(b"t" * 32).verify(token, "host1", now=NOW)
    forged = token.replace(token.split(".")[1], token.split(".")[1][::-1])
    with pytest.raises(InvalidGatewayToken):
        tokens.verify(forged, "host1", now=NOW)


class _Direct:
    def authenticate(self, headers: dict[str, str], peer: Peer) -> str:
        return "direct-" + headers["authorization"].split()[-1]


def test_a_fleet_host_refuses_customer_credentials_unless_direct_calls_are_allowed() -> None:
    tokens = GatewayTokens(SECRET)
    strict = FleetHostAuthenticator(tokens, "host1", None)
    lenient = FleetHostAuthenticator(tokens, "host1", _Direct())
    good = {"authorization": f"Bearer {tokens.mint('acme', 'host1')}"}
    assert strict.authenticate(good, Peer()) == "acme"
    assert lenient.authenticate(good, Peer()) == "acme"
    customer = {"authorization": "Bearer dev_customer_acme"}
    with pytest.raises(MetaldError):
        strict.authenticate(customer, Peer())
    assert lenient.authenticate(customer, Peer()) == "direct-dev_customer_acme"
    # A bad gateway token never falls through to the customer authenticator.
    bad = {"authorization": "Bearer mgw1.e30.bad"}
    with pytest.raises(MetaldError):
        lenient.authenticate(bad, Peer())


def test_placement_takes_the_least_loaded_host_with_room() -> None:
    gib = 1 << 30
    busy = Candidate("a", "u", HostCapacity(8, 8 * gib, 100, vcpus_used=6, memory_used=gib, vm_count=6))
    memory_heavy = Candidate(
        "b", "u", HostCapacity(8, 8 * gib, 100, vcpus_used=1, memory_used=7 * gib, vm_count=1)
    )
    light = Candidate("c", "u", HostCapacity(8, 8 * gib, 100, vcpus_used=2, memory_used=2 * gib, vm_count=2))
    assert choose([busy, memory_heavy, light], 1, gib // 4).host_id == "c"  # type: ignore[union-attr]
    full = Candidate("d", "u", HostCapacity(8, 8 * gib, 3, vm_count=3))
    assert choose([full], 1, gib // 4) is None
    assert choose([memory_heavy], 1, 9 * gib) is None  # larger than the host
    assert choose([memory_heavy], 1, 2 * gib) is memory_heavy  # created VMs may overcommit
