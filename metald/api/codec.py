"""Connect's JSON codec, speaking the reference's JSON: proto field names (snake_case) and
64-bit integers as JSON numbers (the reference shows `"size_bytes": 1073741824`).

Canonical proto3 JSON writes 64-bit integers as strings; every protobuf JSON parser accepts both,
and values beyond 2^53 (not exact in JavaScript) are still written as strings. Requests are
accepted in snake_case and lowerCamelCase, with numbers or strings.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from protobuf import Message
from protobuf._descriptors import DescMessage

_INT64_TYPES = frozenset({"INT64", "UINT64", "SINT64", "FIXED64", "SFIXED64"})
_SAFE = 2**53


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


class SnakeCaseJsonCodec:
    def name(self) -> str:
        return "json"

    def encode(self, message: Message) -> bytes:
        desc = type(message).desc()
        text = message.to_json(use_proto_field_name=True)
        if not _plan(desc):
            return text.encode()
        data = json.loads(text)
        _numbers(data, desc)
        return json.dumps(data, separators=(",", ":")).encode()

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        text = bytes(data).decode() or "{}"
        # Python's parser refuses deep nesting with RecursionError; the native protobuf parser
        # would overflow the C stack instead, so nothing reaches it unchecked.
        check_depth(json.loads(text))
        return message_class.from_json(text)


MAX_JSON_DEPTH = 32


def check_depth(value: Any) -> None:
    """ValueError if JSON nests deeper than any request message can (our schema is ~6 deep)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
