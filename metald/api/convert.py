"""Protobuf <-> domain. The domain dataclasses carry the proto field names, so conversion is a
walk over the dataclass fields; only the message class of each nested field is named here."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from datetime import datetime
from typing import Any

from protobuf import Message
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from metald.domain import model
from metald.domain.errors import invalid
from metald.domain.states import VmState
from metald.gen.vmprovisioner.v1 import vm_pb as pb

# (domain class, field) -> proto message class of that field
_NESTED: dict[tuple[type[Any], str], tuple[type[Any], type[Message]]] = {
    (model.VmConfig, "cpu"): (model.CpuConfig, pb.CpuConfig),
    (model.VmConfig, "memory"): (model.MemoryConfig, pb.MemoryConfig),
    (model.VmConfig, "boot"): (model.BootConfig, pb.BootConfig),
    (model.VmConfig, "storage"): (model.StorageDevice, pb.StorageDevice),
    (model.VmConfig, "network"): (model.NetworkInterface, pb.NetworkInterface),
    (model.VmConfig, "console"): (model.ConsoleConfig, pb.ConsoleConfig),
    (model.NetworkInterface, "rate_limit"): (model.RateLimit, pb.RateLimit),
    (model.NetworkInterface, "host_ipv4"): (model.IpConfig, pb.IPv4Config),
    (model.NetworkInterface, "guest_ipv4"): (model.IpConfig, pb.IPv4Config),
    (model.NetworkInterface, "host_ipv6"): (model.IpConfig, pb.IPv6Config),
    (model.NetworkInterface, "guest_ipv6"): (model.IpConfig, pb.IPv6Config),
    (model.NetworkInterface, "egress"): (model.EgressPolicy, pb.EgressPolicy),
    (model.EgressPolicy, "allow"): (model.EgressRule, pb.EgressRule),
}
_DOMAIN_CLASSES: list[type[Any]] = [model.VmConfig, *{domain for domain, _ in _NESTED.values()}]
_FIELDS = {cls: [f.name for f in dataclasses.fields(cls)] for cls in _DOMAIN_CLASSES}


def _to_proto(obj: Any, message_class: type[Message]) -> Message:
    kwargs: dict[str, Any] = {}
    cls = type(obj)
    for name in _FIELDS[cls]:
        value = getattr(obj, name)
        if value is None:
            continue
        nested = _NESTED.get((cls, name))
        if nested is not None:
            if isinstance(value, tuple):
                value = [_to_proto(v, nested[1]) for v in value]
            else:
                value = _to_proto(value, nested[1])
        elif isinstance(value, tuple):
            value = list(value)
        kwargs[name] = value
    return message_class(**kwargs)


def _from_proto(message: Any, cls: type[Any]) -> Any:
    kwargs: dict[str, Any] = {}
    for name in _FIELDS[cls]:
        value = getattr(message, name)
        if value is None:
            continue
        nested = _NESTED.get((cls, name))
        if nested is not None:
            if isinstance(value, list):
                value = tuple(_from_proto(v, nested[0]) for v in value)
            else:
                value = _from_proto(value, nested[0])
        elif isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, dict):
            value = dict(value)
        kwargs[name] = value
    return cls(**kwargs)


def config_from_proto(message: pb.VmConfig | None) -> model.VmConfig:
    if message is None:
        return model.VmConfig()
    config: model.VmConfig = _from_proto(message, model.VmConfig)
    return config


# id(config) -> (config, its message). The store hands out one VmConfig object per stored row (a
# config is frozen and never changes after CreateVm), so a listing converts each config once, not
# on every page. The entry holds the config, so its id cannot be reused while the entry lives.
_CONFIG_MESSAGES: OrderedDict[int, tuple[model.VmConfig, pb.VmConfig]] = OrderedDict()
_CONFIG_MESSAGES_MAX = 20_000


def config_to_proto(config: model.VmConfig) -> pb.VmConfig:
    """The message of a config; the same object for the same config: never mutate it."""
    entry = _CONFIG_MESSAGES.get(id(config))
    if entry is not None and entry[0] is config:
        return entry[1]
    message = _to_proto(config, pb.VmConfig)
    assert isinstance(message, pb.VmConfig)
    _CONFIG_MESSAGES[id(config)] = (config, message)
    if len(_CONFIG_MESSAGES) > _CONFIG_MESSAGES_MAX:
        _CONFIG_MESSAGES.popitem(last=False)
    return message


def state_to_proto(state: VmState) -> pb.VmState:
    return pb.VmState(int(state))


def state_from_proto(state: pb.VmState | int) -> VmState:
    try:
        return VmState(int(state))
    except ValueError:
        raise invalid("state_filter", f"unknown VM state {int(state)}") from None


def timestamp(value: datetime) -> Timestamp:
    micros = int(value.timestamp() * 1_000_000)
    return Timestamp(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1000)
