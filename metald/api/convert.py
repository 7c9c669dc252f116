"""Protobuf <-> domain, through the one JSON form both share (proto field names)."""

from __future__ import annotations

import json
from datetime import datetime

from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from metald.domain.model import VmConfig, from_dict, to_dict
from metald.domain.states import VmState
from metald.gen.vmprovisioner.v1 import vm_pb as pb


def config_from_proto(message: pb.VmConfig | None) -> VmConfig:
    if message is None:
        return VmConfig()
    return from_dict(VmConfig, json.loads(message.to_json(use_proto_field_name=True)))


def config_to_proto(config: VmConfig) -> pb.VmConfig:
    return pb.VmConfig.from_json(json.dumps(to_dict(config)))


def state_to_proto(state: VmState) -> pb.VmState:
    return pb.VmState(int(state))


def state_from_proto(state: pb.VmState | int) -> VmState:
    return VmState(int(state))


def timestamp(value: datetime) -> Timestamp:
    micros = int(value.timestamp() * 1_000_000)
    return Timestamp(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1000)
