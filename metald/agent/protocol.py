"""Version 1 frames of the guest agent protocol (the guest side: metald/guest/files/src/metald-agent.c).

A frame is a 12-byte header `magic u8 | version u8 | type u8 | flags u8 | request id u32 | payload
length u32` (big-endian) and a payload of fields `tag u8 | length u32 | bytes`; integers are 8 bytes,
big-endian, two's complement. Pure functions: nothing here does I/O.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass

MAGIC = 0xF5
VERSION = 1
HEADER = struct.Struct(">BBBBII")
MIB = 1 << 20
MAX_DATA = 16 * MIB  # per exec output stream, per file, per stdin
MAX_PAYLOAD = 17 * MIB  # MAX_DATA plus room for the other fields (the guest's own limit too)
_FIELD = struct.Struct(">BI")
_INT = struct.Struct(">q")


class MsgType(enum.IntEnum):
    PING = 2
    PONG = 3
    OK = 4
    ERROR = 5
    EXEC = 16
    OUTPUT = 17
    EXIT = 18
    KILL = 19
    WRITE = 32
    READ = 33
    FILE = 34
    CLOCK = 48
    ENTROPY = 49
    POWER = 50
    REFRESH = 51  # agent version 2: a restored clone's clock, entropy, hostname and vm_id; 3: NICs


class Tag(enum.IntEnum):
    ARG = 1
    ENV = 2
    CWD = 3
    STDIN = 4
    TIMEOUT_MS = 5
    PATH = 6
    MODE = 7
    DATA = 8
    CODE = 9
    MESSAGE = 10
    STREAM = 11
    TIMED_OUT = 12
    TRUNCATED = 13
    SIZE = 14
    TIME_NS = 15
    BOOT_ID = 16
    VERSION = 17
    ACTION = 18
    SIGNAL = 19
    UPTIME_MS = 20
    HOSTNAME = 21
    VM_ID = 22
    NIC = 23  # agent version 3, in REFRESH: MAC,IP4/PFX,GW4,IP6/PFX,GW6 of eth0, eth1, ... in order


NICS_VERSION = 3  # the first agent whose REFRESH sets the NICs: its OK says so with a VERSION


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame: the channel cannot be trusted any more."""


FieldValue = bytes | str | int


@dataclass(frozen=True)
class Frame:
    type: int
    request_id: int
    fields: tuple[tuple[int, bytes], ...] = ()

    def raw(self, tag: Tag) -> bytes | None:
        """The last value of `tag`, or None."""
        for t, value in reversed(self.fields):
            if t == tag:
                return value
        return None

    def integer(self, tag: Tag, default: int = 0) -> int:
        value = self.raw(tag)
        if value is None:
            return default
        if len(value) != _INT.size:
            raise ProtocolError(f"field {tag.name} is not an 8-byte integer")
        return int(_INT.unpack(value)[0])

    def text(self, tag: Tag) -> str:
        return (self.raw(tag) or b"").decode(errors="replace")


def _field(tag: int, value: FieldValue) -> bytes:
    if isinstance(value, int):
        data = _INT.pack(value)
    elif isinstance(value, str):
        data = value.encode()
    else:
        data = value
    return _FIELD.pack(tag, len(data)) + data


def encode(msg_type: MsgType, request_id: int, fields: Iterable[tuple[Tag, FieldValue]] = ()) -> bytes:
    payload = b"".join(_field(tag, value) for tag, value in fields)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(MAGIC, VERSION, msg_type, 0, request_id, len(payload)) + payload


def parse_header(header: bytes, max_payload: int = MAX_PAYLOAD) -> tuple[int, int, int]:
    """(type, request id, payload length) of a 12-byte header; ProtocolError if it is not one."""
    magic, version, msg_type, _flags, request_id, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic byte 0x{magic:02x}")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    if length > max_payload:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {max_payload}")
    return msg_type, request_id, length


def parse_fields(payload: bytes) -> tuple[tuple[int, bytes], ...]:
    """The fields of a payload; ProtocolError unless they fill it exactly."""
    fields: list[tuple[int, bytes]] = []
    offset = 0
    view = memoryview(payload)
    while offset < len(payload):
        if len(payload) - offset < _FIELD.size:
            raise ProtocolError("truncated field header")
        tag, length = _FIELD.unpack_from(payload, offset)
        offset += _FIELD.size
        if length > len(payload) - offset:
            raise ProtocolError(f"field {tag} of {length} bytes overruns its frame")
        fields.append((tag, bytes(view[offset : offset + length])))
        offset += length
    return tuple(fields)


def sets_nics(refresh_ok: Frame) -> bool:
    """Whether the agent that answered a REFRESH with this OK set the NICs it named (version 3 on);
    an older agent ignores them and answers with no version."""
    version = refresh_ok.text(Tag.VERSION)
    return version.isdigit() and int(version) >= NICS_VERSION
