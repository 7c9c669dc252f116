"""The domain values copied field by field to and from messages (metald/api/convert.py) bear the
message's names: a field added on one side only would be dropped silently, so it fails here."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from protobuf import Message

from metald.api.convert import from_message, to_message
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.ports import InterfaceInfo, VmMetrics
from metald.usecases import ExecResult

PAIRS: list[tuple[Any, type[Message]]] = [
    (VmMetrics(1, 2, 3, 4, 5, 6), pb.VmMetrics),
    (
        InterfaceInfo("eth0", "tap0", "02:00:00:00:00:01", "vh0", "10.0.0.2/24", "fd00::2/64"),
        pb.NetworkInterfaceInfo,
    ),
    (ExecResult(3, b"out", b"err", timed_out=True, truncated=True), pb.ExecVmResponse),
]


@pytest.mark.parametrize(("value", "message_class"), PAIRS)
def test_a_value_goes_to_its_message_and_back_unchanged(value: Any, message_class: type[Message]) -> None:
    names = {f.name for f in dataclasses.fields(value)}
    assert names == set(message_class().__slots__)
    message = to_message(value, message_class)
    assert all(getattr(message, n) == getattr(value, n) for n in names)
    assert from_message(message, type(value)) == value
