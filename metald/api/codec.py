"""Connect's codecs, speaking the reference's JSON: proto field names (snake_case) and 64-bit
integers as JSON numbers (the reference shows `"size_bytes": 1073741824`).

Canonical proto3 JSON writes 64-bit integers as strings; every protobuf JSON parser accepts both,
and values beyond 2^53 (not exact in JavaScript) are still written as strings. Requests are
accepted in snake_case and lowerCamelCase, with numbers or strings.

Each request is parsed once (`json.loads`, then the parsed value becomes the message) and each
response encoded once: protobuf-py's native JSON text, whose 64-bit integers are then rewritten in
the text (a key of a 64-bit field, right after `{` or `,`, can only be that field: inside a JSON
string every quote is escaped), unless a map below holds such a key (then the parsed-value path). Unknown JSON fields are dropped, as connect-go and binary protobuf do, so a
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


def _reachable(desc: DescMessage) -> list[DescMessage]:
    """Our message types at or below `desc` (not the well-known types: they have JSON forms of
    their own), each once."""
    seen: dict[str, DescMessage] = {}
    stack = [desc]
    while stack:
        message = stack.pop()
        if message.type_name in seen or message.type_name.startswith("google."):
            continue
        seen[message.type_name] = message
        stack.extend(sub for field in message.fields if (sub := _kind(field)[1]) is not None)
    return list(seen.values())


@functools.cache
def _int64_keys(desc: DescMessage) -> frozenset[str]:
    """The JSON keys of the 64-bit fields below `desc`, for rewriting them in the text; empty when
    a key name is also some other field's, or a repeated one: then only the parsed path is right."""
    int64: set[str] = set()
    other: set[str] = set()
    for message in _reachable(desc):
        for field in message.fields:
            repeated = hasattr(field.value, "element")
            if _kind(field)[0] == "int64" and repeated:
                return frozenset()
            (int64 if _kind(field)[0] == "int64" else other).add(field.name)
    return frozenset() if int64 & other else frozenset(int64)


@functools.cache
def _map_paths(desc: DescMessage) -> tuple[tuple[str, bool, DescMessage | None], ...]:
    """(attribute, is a map, message below) of the fields that are string maps or lead to one."""
    out: list[tuple[str, bool, DescMessage | None]] = []
    for field in desc.fields:
        if hasattr(field.value, "key"):
            out.append((field.local_name, True, None))
            continue
        kind, sub = _kind(field)
        ours = sub is not None and sub is not desc and not sub.type_name.startswith("google.")
        if kind == "message" and ours and sub is not None and _map_paths(sub):
            out.append((field.local_name, False, sub))
    return tuple(out)


def _map_holds(message: Any, desc: DescMessage, keys: frozenset[str]) -> bool:
    """Whether a map anywhere in `message` has one of `keys` (the text rewrite would take it for a field)."""
    for attr, is_map, sub in _map_paths(desc):
        value = getattr(message, attr)
        if is_map:
            if not keys.isdisjoint(value):
                return True
        elif sub is not None:
            items = value if isinstance(value, list) else ([value] if value is not None else [])
            if any(_map_holds(item, sub, keys) for item in items):
                return True
    return False


def _int64_numbers(text: str, keys: frozenset[str]) -> str:
    """`"key":"123"` -> `"key":123` for each of `keys` right after `{` or `,` (a key there is a
    field's: inside a JSON string every quote is escaped), up to 2^53."""
    for key in keys:
        marker = f'"{key}":"'
        if marker not in text:
            continue
        parts = text.split(marker)
        out = [parts[0]]
        for part in parts[1:]:
            end = part.find('"')
            digits = part[:end]
            number = digits.removeprefix("-")
            if (
                out[-1][-1:] in ("{", ",")
                and number.isascii()
                and number.isdigit()
                and abs(int(digits)) < _SAFE
            ):
                out.append(f'"{key}":{digits}{part[end + 1 :]}')
            else:
                out.append(marker + part)
        text = "".join(out)
    return text


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
        keys = _int64_keys(desc)
        if keys and not _map_holds(message, desc, keys):
            return _int64_numbers(message.to_json(use_proto_field_name=True), keys).encode()
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
