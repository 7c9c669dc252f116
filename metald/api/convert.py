"""Protobuf <-> domain. The domain dataclasses carry the proto field names, so conversion is a
walk over the dataclass fields; only the message class of each nested field is named here."""

from __future__ import annotations

import dataclasses
import typing
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any, Generic, TypeVar

from protobuf import Message
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from metald.domain import model
from metald.domain.errors import invalid
from metald.domain.states import VmState
from metald.gen.vmprovisioner.v1 import vm_pb as pb

# The message class of a nested domain dataclass is the one of the same name in vm_pb, except:
_RENAMED: dict[tuple[type[Any], str], type[Message]] = {
    (model.NetworkInterface, "host_ipv4"): pb.IPv4Config,
    (model.NetworkInterface, "guest_ipv4"): pb.IPv4Config,
    (model.NetworkInterface, "host_ipv6"): pb.IPv6Config,
    (model.NetworkInterface, "guest_ipv6"): pb.IPv6Config,
}
# domain class -> [(field, (nested domain class, its message class) or None)]
_FIELDS: dict[type[Any], list[tuple[str, tuple[type[Any], type[Message]] | None]]] = {}
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
    other: nested messages by their classes (_fields_of), repeated fields as lists in messages and tuples in the domain."""
    to_proto = target is not domain
    fields = _FIELDS.get(domain)
    if fields is None:
        fields = _FIELDS[domain] = _fields_of(domain)
    kwargs: dict[str, Any] = {}
    for name, nested in fields:
        value = getattr(obj, name)
        if value is None:
            continue
        repeated = isinstance(value, (list, tuple))
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


def _fields_of(domain: type[Any]) -> list[tuple[str, tuple[type[Any], type[Message]] | None]]:
    """The fields of a domain dataclass; for those holding dataclasses (`X | None` or `tuple[X, ...]`),
    the nested domain class and its message class."""
    hints = typing.get_type_hints(domain)
    fields: list[tuple[str, tuple[type[Any], type[Message]] | None]] = []
    for field in dataclasses.fields(domain):
        inner = next((t for t in typing.get_args(hints[field.name]) if dataclasses.is_dataclass(t)), None)
        nested = None
        if isinstance(inner, type):
            nested = inner, _RENAMED.get((domain, field.name)) or getattr(pb, inner.__name__)
        fields.append((field.name, nested))
    return fields


def config_from_proto(message: pb.VmConfig | None) -> model.VmConfig:
    if message is None:
        return model.VmConfig()
    return from_message(message, model.VmConfig)


K = TypeVar("K")
V = TypeVar("V")


class _ByIdentity(Generic[K, V]):
    """Messages of immutable values that the store hands out as one object per stored row (a
    config, a creation time: never changed after CreateVm), so a listing converts each once, not on
    every page. An entry holds its value, so the value's id cannot be reused while the entry lives.
    The message is shared: never mutate it."""

    def __init__(self, convert: Callable[[K], V], most: int = 20_000) -> None:
        self._convert = convert
        self._most = most
        self._entries: OrderedDict[int, tuple[K, V]] = OrderedDict()

    def __call__(self, value: K) -> V:
        entry = self._entries.get(id(value))
        if entry is not None and entry[0] is value:
            return entry[1]
        message = self._convert(value)
        self._entries[id(value)] = (value, message)
        if len(self._entries) > self._most:
            self._entries.popitem(last=False)
        return message


def _config_message(config: model.VmConfig) -> pb.VmConfig:
    return to_message(config, pb.VmConfig)


config_to_proto: _ByIdentity[model.VmConfig, pb.VmConfig] = _ByIdentity(_config_message)
_STATES = {state: pb.VmState(int(state)) for state in VmState}


def state_to_proto(state: VmState) -> pb.VmState:
    return _STATES[state]


def state_from_proto(state: pb.VmState | int) -> VmState:
    try:
        return VmState(int(state))
    except ValueError:
        raise invalid("state_filter", f"unknown VM state {int(state)}") from None


def timestamp(value: datetime) -> Timestamp:
    micros = int(value.timestamp() * 1_000_000)
    return Timestamp(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1000)


# A VM's created_at: the store hands out one object per stored row.
created_timestamp: _ByIdentity[datetime, Timestamp] = _ByIdentity(timestamp)
