"""Derived MACs: stable, locally administered unicast, distinct."""

from __future__ import annotations

from metald.domain.validation import check_mac
from metald.network.mac import derive_mac


def test_derived_mac_is_stable_unicast_and_locally_administered() -> None:
    seen = set()
    for n in range(500):
        mac = derive_mac(f"vm_{n}", "eth0")
        assert mac == derive_mac(f"vm_{n}", "eth0")
        first = int(mac[:2], 16)
        assert first & 0x01 == 0 and first & 0x02 == 0x02, mac
        assert check_mac(mac, "f") == mac  # what the API accepts as an explicit MAC
        seen.add(mac)
    assert len(seen) == 500
    assert derive_mac("vm_1", "eth0") != derive_mac("vm_1", "eth1")
    assert derive_mac("vm_1", "eth0") != derive_mac("vm_1", "eth0", attempt=1)
