"""Connect's codecs, speaking the reference's JSON: proto field names (snake_case) and 64-bit
integers as JSON numbers (the reference shows `"size_bytes": 1073741824`).

Canonical proto3 JSON writes 64-bit integers as strings; every protobuf JSON parser accepts both,
and values beyond 2^53 (not exact in JavaScript) are still written as strings. Requests are
accepted in snake_case and lowerCamelCase, with numbers or strings.

Each request is parsed once (`json.loads`, then the parsed value becomes the message) and each
response encoded once. Unknown JSON fields are dropped, as connect-go and binary protobuf do, so a
newer client works against an older daemon; unknown enum names are still refused (a misspelt
state filter must not silently list everything). A body that does not parse is INVALID_ARGUMENT
with ErrorInfo reason MALFORMED_REQUEST, in JSON and in binary alike.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from connectrpc.code import Code
from connectrpc.codec import proto_binary_codec
from connectrpc.errors import ConnectError
from protobuf import Message, message_from_json_value, message_to_json_value
from protobuf._descriptors import DescMessage

from metald.domain.errors import ERROR_DOMAIN
from metald.gen.google.rpc.error_details_pb import ErrorInfo

_INT64_TYPES = frozenset({"INT64", "UINT64", "SINT64", "FIXED64", "SFIXED64"})
_SAFE = 2**53
MAX_JSON_DEPTH = 32
MALFORMED_REQUEST = "MALFORMED_REQUEST"


def malformed(what: str, exc: Exception) -> ConnectError:
    info = ErrorInfo(reason=MALFORMED_REQUEST, domain=ERROR_DOMAIN, metadata={"encoding": what})
    return ConnectError(Code.INVALID_ARGUMENT, f"malformed {what} request: {exc}", [info])


def _kind(field: Any) -> tuple[str, DescMessage | None]:
    """("int64" | "message" | "other", message descriptor) of a field or list element."""
    value = field.value
    if hasattr(value, "element"):  # repeated: the element is the message descriptor itself
        value = value.element
        if isinstance(value, DescMessage):
            return "message", value
    message = getattr(value, "message", None)
    if message is not None:
        return "message", message
    if str(field.proto.type).rsplit(".", 1)[-1] in _INT64_TYPES:
        return "int64", None
    return "other", None


@functools.cache
def _plan(desc: DescMessage) -> tuple[tuple[str, str, DescMessage | None], ...]:
    """For each field that holds 64-bit integers somewhere below it: (json key, kind, sub-desc)."""
    out = []
    for field in desc.fields:
        if hasattr(field.value, "key"):  # maps: string -> string here, nothing to do
            continue
        kind, sub = _kind(field)
        if kind == "int64" or (kind == "message" and sub is not None and _plan(sub)):
            out.append((field.name, kind, sub))
    return tuple(out)


@functools.cache
def _known(desc: DescMessage) -> dict[str, DescMessage | None]:
    """Every JSON key of a message (both spellings) -> the message below it, if it is one of ours."""
    keys: dict[str, DescMessage | None] = {}
    for field in desc.fields:
        kind, sub = _kind(field)
        if hasattr(field.value, "key") or (sub is not None and sub.type_name.startswith("google.")):
            sub = None  # maps and well-known types have their own JSON forms
        keys[field.name] = keys[field.json_name] = sub if kind == "message" else None
    return keys


def _numbers(data: Any, desc: DescMessage) -> None:
    if not isinstance(data, dict):
        return
    for key, kind, sub in _plan(desc):
        if key not in data:
            continue
        value = data[key]
        items = value if isinstance(value, list) else [value]
        if kind == "message" and sub is not None:
            for item in items:
                _numbers(item, sub)
        elif isinstance(value, list):
            data[key] = [_as_number(v) for v in value]
        else:
            data[key] = _as_number(value)


def _as_number(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip("-").isdigit() and abs(int(value)) < _SAFE:
        return int(value)
    return value


def prune(value: Any, desc: DescMessage | None) -> None:
    """One walk over a parsed request: ValueError if it nests deeper than any request can (our
    schema is ~6 deep; Python's parser refuses deep nesting with RecursionError and the native
    protobuf parser would overflow the C stack, so nothing reaches it unchecked), and keys that
    `desc` does not know removed at every level of our own messages."""
    stack: list[tuple[Any, DescMessage | None, int]] = [(value, desc, 1)]
    while stack:
        item, message, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, list):
            stack.extend((v, message, depth + 1) for v in item)
        elif isinstance(item, dict):
            if message is None:
                stack.extend((v, None, depth + 1) for v in item.values())
                continue
            known = _known(message)
            for key in [k for k in item if k not in known]:
                del item[key]
            stack.extend((v, known[k], depth + 1) for k, v in item.items())


class SnakeCaseJsonCodec:
    def name(self) -> str:
        return "json"

    def encode(self, message: Message) -> bytes:
        desc = type(message).desc()
        if not _plan(desc):
            return message.to_json(use_proto_field_name=True).encode()
        data = message_to_json_value(message, use_proto_field_name=True)
        _numbers(data, desc)
        return json.dumps(data, separators=(",", ":")).encode()

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        try:
            value = json.loads(bytes(data) or b"{}")
            prune(value, message_class.desc())
            return message_from_json_value(message_class, value)
        except (ValueError, TypeError, RecursionError) as exc:  # not JSON, or not this message
            raise malformed("JSON", exc) from None


class CheckedProtoCodec:
    """The binary protobuf codec, with an ErrorInfo on bodies that do not parse."""

    def __init__(self) -> None:
        self._codec = proto_binary_codec()

    def name(self) -> str:
        return "proto"

    def encode(self, message: Message) -> bytes:
        return bytes(self._codec.encode(message))

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        try:
            return self._codec.decode(data, message_class)
        except (ValueError, TypeError, RecursionError) as exc:
            raise malformed("protobuf", exc) from None
