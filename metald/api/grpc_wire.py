"""gRPC and gRPC-Web responses to the letter of the gRPC spec, whatever the runtime writes.

- `grpc-message` is percent-encoded only where the spec says (bytes outside 0x20-0x7E, and `%`):
  connectrpc 0.13 encodes every reserved character, so grpc-js and friends showed users
  `vcpu_count%3A%20must…`. Fixed in headers (trailers-only answers), HTTP/2 trailers and the
  gRPC-Web trailer frame.
- Every gRPC response says which compressions the server accepts (`grpc-accept-encoding`), so a
  client refused with UNIMPLEMENTED for an unknown `grpc-encoding` knows what to use instead.
"""

from __future__ import annotations

import struct
from urllib.parse import unquote_to_bytes

from metald.api.asgi import ASGIApp, Message, Receive, Scope, Send

GRPC_MESSAGE = b"grpc-message"
TRAILER_FRAME = 0x80


def spec_percent_encode(text: bytes) -> bytes:
    """Percent-encode the UTF-8 bytes outside 0x20-0x7E, and `%` itself (gRPC over HTTP/2 spec)."""
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in text)


def _reencoded(value: bytes) -> bytes:
    return spec_percent_encode(unquote_to_bytes(value))


def fix_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, _reencoded(v) if k.lower() == GRPC_MESSAGE else v) for k, v in headers]


def fix_trailer_frame(body: bytes) -> bytes:
    """The gRPC-Web trailer frame (uncompressed) with its grpc-message re-encoded."""
    if len(body) < 5 or body[0] != TRAILER_FRAME or struct.unpack(">I", body[1:5])[0] != len(body) - 5:
        return body
    lines = body[5:].split(b"\r\n")
    fixed = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == GRPC_MESSAGE:
            line = name + b": " + _reencoded(value.strip())
        fixed.append(line)
    block = b"\r\n".join(fixed)
    return struct.pack(">BI", TRAILER_FRAME, len(block)) + block


class GrpcWire:
    def __init__(self, app: ASGIApp, accept_encoding: bytes) -> None:
        self._app = app
        self._accept_encoding = accept_encoding

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_grpc(scope):
            await self._app(scope, receive, send)
            return

        async def fixing_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                headers = fix_headers(list(message.get("headers", [])))
                headers.append((b"grpc-accept-encoding", self._accept_encoding))
                message = {**message, "headers": headers}
            elif kind == "http.response.trailers":
                message = {**message, "headers": fix_headers(list(message.get("headers", [])))}
            elif kind == "http.response.body" and not message.get("more_body", False):
                message = {**message, "body": fix_trailer_frame(bytes(message.get("body", b"")))}
            await send(message)

        await self._app(scope, receive, fixing_send)


def _is_grpc(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-type":
            return bytes(value).startswith(b"application/grpc")
    return False
