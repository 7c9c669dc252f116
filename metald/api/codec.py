"""Connect's JSON codec, but speaking the proto field names (snake_case) as the reference does.

Requests are accepted in both snake_case and lowerCamelCase (protobuf JSON parsing does that).
"""

from __future__ import annotations

from typing import Any

from protobuf import Message


class SnakeCaseJsonCodec:
    def name(self) -> str:
        return "json"

    def encode(self, message: Message) -> bytes:
        return message.to_json(use_proto_field_name=True).encode()

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        return message_class.from_json(bytes(data).decode() or "{}")
