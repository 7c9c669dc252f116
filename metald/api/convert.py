"""Protobuf <-> domain. The domain dataclasses carry the proto field names, so conversion is a
walk over the dataclass fields; only the message class of each nested field is named here."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from datetime import datetime
from typing import Any, TypeVar

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
_FIELDS: dict[type[Any], list[str]] = {}
M = TypeVar("M", bound=Message)
T = TypeVar("T")


def to_message(value: Any, message_class: type[M]) -> M:
    """The message of a domain dataclass whose fields bear the message's names (nested ones too)."""
    message: M = _convert(value, message_class, type(value))
    return message


def from_message(message: Message, cls: type[T]) -> T:
    """The domain dataclass `cls` of a message whose fields bear its names (nested ones too)."""
    value: T = _convert(message, cls, cls)
    return value


def _convert(obj: Any, target: type[Any], domain: type[Any]) -> Any:
    """Copy the fields of the dataclass `domain` from `obj` into a new `target`, one way or the
    other: nested messages by _NESTED, repeated fields as lists in messages and tuples in the domain."""
    to_proto = target is not domain
    names = _FIELDS.get(domain)
    if names is None:
        names = _FIELDS[domain] = [f.name for f in dataclasses.fields(domain)]
    kwargs: dict[str, Any] = {}
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        repeated = isinstance(value, (list, tuple))
        nested = _NESTED.get((domain, name))
        if nested is not None:
            inner, message_class = nested
            into = message_class if to_proto else inner
            value = [_convert(v, into, inner) for v in value] if repeated else _convert(value, into, inner)
        if repeated:
            value = list(value) if to_proto else tuple(value)
        elif isinstance(value, dict) and not to_proto:
            value = dict(value)
        kwargs[name] = value
    return target(**kwargs)


def config_from_proto(message: pb.VmConfig | None) -> model.VmConfig:
    if message is None:
        return model.VmConfig()
    return from_message(message, model.VmConfig)


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
    message = to_message(config, pb.VmConfig)
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
