"""Device and namespace names: short enough for Linux, stable, and parseable back."""

from __future__ import annotations

import pytest

from metald.domain.ids import new_vm_id
from metald.network import names


def test_names_fit_ifnamsiz_and_are_stable() -> None:
    vm_id = "vm_" + "z" * 61
    for i in range(names.MAX_NICS):
        for name in (names.tap_device(vm_id, i), names.host_veth(vm_id, i), names.vm_bridge(i)):
            assert len(name) <= names.IFNAMSIZ, name
    assert len(names.customer_bridge(2**24)) <= names.IFNAMSIZ
    assert names.tap_device(vm_id, 0) == names.tap_device(vm_id, 0) == f"tap_{names.id8(vm_id)}"
    assert names.vm_netns("vm_1") == "ns_vm_" + names.id8("vm_1")


def test_id8_is_a_hash_not_the_id_prefix() -> None:
    """Generated ids share their time prefix; their names must still differ."""
    ids = [new_vm_id(now_ms=1_700_000_000_000) for _ in range(200)]
    assert len({names.id8(i) for i in ids}) == 200
    assert names.id8("vm_abcdefgh") != "vm_abcde"[:8]


def test_index_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError):
        names.tap_device("vm_1", names.MAX_NICS)


def test_names_parse_back_only_when_ours() -> None:
    vm_id = "vm_x"
    assert names.netns_id8(names.vm_netns(vm_id)) == names.id8(vm_id)
    assert names.host_veth_id8(names.host_veth(vm_id, 0)) == names.id8(vm_id)
    assert names.host_veth_id8(names.host_veth(vm_id, 3)) == names.id8(vm_id)
    for foreign in (
        "ns_vm_1234567",
        "ns_vm_12345678x",
        "metald-host",
        "vh_1234567g",
        "vh_12345678_12",
        "eth0",
    ):
        assert names.netns_id8(foreign) is None
        assert names.host_veth_id8(foreign) is None
