"""The VM and its configuration as the domain sees them: plain dataclasses, no protobuf.

Shapes mirror the API's VmConfig so that one JSON form (proto field names) serves the API,
the store and the backends.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from metald.domain.pending import PendingOp
from metald.domain.states import VmState

MIB = 1024 * 1024


@dataclass(frozen=True)
class CpuConfig:
    vcpu_count: int = 0
    cpu_template: str = ""


@dataclass(frozen=True)
class MemoryConfig:
    size_bytes: int = 0


@dataclass(frozen=True)
class BootConfig:
    kernel_path: str = ""
    kernel_args: str = ""
    initrd_path: str = ""


@dataclass(frozen=True)
class StorageDevice:
    device_id: str = ""
    path_on_host: str = ""
    is_read_only: bool = False
    is_root_device: bool = False


@dataclass(frozen=True)
class RateLimit:
    bandwidth_bytes_per_second: int = 0
    burst_bytes: int = 0
    refill_time_millis: int = 0


@dataclass(frozen=True)
class IpConfig:
    address: str = ""
    prefix_length: int = 0
    gateway: str = ""


@dataclass(frozen=True)
class EgressRule:
    cidr: str = ""
    ports: tuple[int, ...] = ()
    protocol: str = ""  # "tcp", "udp", "icmp" or "" (any)


@dataclass(frozen=True)
class EgressPolicy:
    """Destinations beyond the customer network the guest may reach; empty: none."""

    allow: tuple[EgressRule, ...] = ()


@dataclass(frozen=True)
class NetworkInterface:
    interface_id: str = ""
    type: str = ""
    guest_mac: str = ""
    rate_limit: RateLimit | None = None
    host_ipv4: IpConfig | None = None
    guest_ipv4: IpConfig | None = None
    host_ipv6: IpConfig | None = None
    guest_ipv6: IpConfig | None = None
    egress: EgressPolicy | None = None


@dataclass(frozen=True)
class ConsoleConfig:
    type: str = ""
    output_file: str = ""


@dataclass(frozen=True)
class VmConfig:
    cpu: CpuConfig | None = None
    memory: MemoryConfig | None = None
    boot: BootConfig | None = None
    storage: tuple[StorageDevice, ...] = ()
    network: tuple[NetworkInterface, ...] = ()
    console: ConsoleConfig | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def vcpu_count(self) -> int:
        return self.cpu.vcpu_count if self.cpu else 0

    @property
    def memory_bytes(self) -> int:
        return self.memory.size_bytes if self.memory else 0


@dataclass(frozen=True)
class NicAddress:
    """What the daemon settled for one interface at create time (stable for the VM's life)."""

    interface_id: str
    mac: str
    guest_ipv4: str = ""  # "addr/prefix" or ""
    gateway_ipv4: str = ""
    guest_ipv6: str = ""
    gateway_ipv6: str = ""


@dataclass
class Vm:
    vm_id: str
    customer_id: str
    config: VmConfig
    state: VmState
    created_at: datetime
    updated_at: datetime
    nics: tuple[NicAddress, ...] = ()
    # Why the VM last stopped ("guest_poweroff", "vmm_exited", "shutdown_requested", ...).
    shutdown_reason: str = ""
    # A multi-step operation in flight; a daemon killed halfway finishes or undoes it on restart.
    pending: PendingOp = PendingOp.NONE
    # Insertion order, assigned by the store; the keyset for pagination.
    seq: int = 0
    # The snapshot this VM was cloned from ("" for none); fixed at CreateVm.
    snapshot_id: str = ""

    def __copy__(self) -> Vm:
        """A shallow copy whose fields are its own to change. Stores hand out a copy per record
        read (51 per ListVms page); copy.copy's generic path costs ~3x this."""
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        return twin


# ---- one JSON form (proto field names) for config <-> dict --------------------------------------

T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> JSON-ready dict, leaving out unset (None/empty) members like proto3 JSON does."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = to_dict(getattr(obj, f.name))
            if value is None or value == () or value == [] or value == {}:
                continue
            if value == f.default and not dataclasses.is_dataclass(getattr(obj, f.name)):
                continue
            out[f.name] = value
        return out
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type[T], data: Any) -> T:
    """JSON dict (proto field names; int64 may be strings) -> dataclass tree; unknown keys ignored."""
    decoded: T = _decoder(cls)(data)
    return decoded


_DECODERS: dict[Any, Callable[[Any], Any]] = {}


def _decoder(cls: Any) -> Callable[[Any], Any]:
    """A decoder per dataclass, built once: type hints are costly to resolve on every call."""
    decoder = _DECODERS.get(cls)
    if decoder is None:
        decoder = _DECODERS[cls] = _build_decoder(cls)
    return decoder


def _build_decoder(cls: Any) -> Callable[[Any], Any]:
    hints = typing.get_type_hints(cls)
    fields = [(f.name, _converter(hints[f.name])) for f in dataclasses.fields(cls)]

    def decode(data: Any) -> Any:
        return cls(**{name: convert(data[name]) for name, convert in fields if name in data})

    return decode


def _converter(tp: Any) -> Callable[[Any], Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = _converter(next(a for a in typing.get_args(tp) if a is not type(None)))
        return lambda value: None if value is None else inner(value)
    if origin is tuple:
        item = _converter(typing.get_args(tp)[0])
        return lambda value: tuple(item(v) for v in value)
    if origin is dict:
        return lambda value: {str(k): str(v) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return lambda value: _decoder(tp)(value)
    if tp is int or tp is bool:
        return tp
    return lambda value: value
