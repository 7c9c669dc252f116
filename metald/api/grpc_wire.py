"""gRPC and gRPC-Web responses to the letter of the gRPC spec, whatever the runtime writes.

- `grpc-message` is percent-encoded only where the spec says (bytes outside 0x20-0x7E, and `%`):
  connectrpc 0.13 encodes every reserved character, so grpc-js and friends showed users
  `vcpu_count%3A%20must…`. Fixed in headers (trailers-only answers), HTTP/2 trailers and the
  gRPC-Web trailer frame.
- Every gRPC response says which compressions the server accepts (`grpc-accept-encoding`), so a
  client refused with UNIMPLEMENTED for an unknown `grpc-encoding` knows what to use instead.
- An unknown service or method (HTTP 404 from the router or the runtime) is a proper gRPC answer:
  HTTP 200 with grpc-status 12 UNIMPLEMENTED, as grpc-go and grpc-java answer.
- A trailers-only answer (the status in the response headers) over HTTP/2 is sent as headers and
  then trailers: hypercorn cannot end a stream on its first HEADERS frame (it always adds an
  empty END_STREAM DATA frame), which grpcio reads as "Stream removed", UNKNOWN. gRPC-Web keeps
  trailers-only headers, which its spec allows.
"""

from __future__ import annotations

import json
import struct
from urllib.parse import unquote_to_bytes

from metald.api.asgi import ASGIApp, Message, Receive, Scope, Send

GRPC_MESSAGE = b"grpc-message"
GRPC_STATUS = b"grpc-status"
STATUS_HEADERS = (GRPC_STATUS, GRPC_MESSAGE, b"grpc-status-details-bin")
UNIMPLEMENTED = b"12"
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
        content_type = _content_type(scope)
        if scope["type"] != "http" or not content_type.startswith(b"application/grpc"):
            await self._app(scope, receive, send)
            return
        await self._app(scope, receive, _GrpcResponse(scope, content_type, send, self._accept_encoding).send)


class _GrpcResponse:
    """One gRPC or gRPC-Web response on its way out."""

    def __init__(self, scope: Scope, content_type: bytes, send: Send, accept_encoding: bytes) -> None:
        self._send = send
        self._path: str = scope["path"]
        web = content_type.startswith(b"application/grpc-web")
        self._content_type = b"application/grpc-web" if web else b"application/grpc"
        self._accept_encoding = accept_encoding
        te = next((v for k, v in scope.get("headers", []) if k.lower() == b"te"), b"")
        # hypercorn sends trailers only to a request that said `te: trailers` (every gRPC client)
        self._real_trailers = not web and scope.get("http_version") == "2" and te == b"trailers"
        self._not_found: bytes | None = None  # the body of a 404, replaced by UNIMPLEMENTED
        self._held_status: list[tuple[bytes, bytes]] = []

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self._not_found is not None:
            if kind == "http.response.body":
                self._not_found += bytes(message.get("body", b""))
                if not message.get("more_body", False):
                    body, self._not_found = self._not_found, None
                    await self._unimplemented(_json_message(body) or f"no such method {self._path}")
            return
        if kind == "http.response.start":
            if message.get("status") == 404:
                self._not_found = b""
                return
            headers = [
                *fix_headers(list(message.get("headers", []))),
                (b"grpc-accept-encoding", self._accept_encoding),
            ]
            if self._real_trailers and not message.get("trailers", False):
                self._held_status = [(k, v) for k, v in headers if k.lower() in STATUS_HEADERS]
                if self._held_status:
                    headers = [(k, v) for k, v in headers if k.lower() not in STATUS_HEADERS]
                    message = {**message, "trailers": True}
            message = {**message, "headers": headers}
        elif kind == "http.response.trailers":
            message = {**message, "headers": fix_headers(list(message.get("headers", [])))}
        elif kind == "http.response.body" and not message.get("more_body", False):
            message = {**message, "body": fix_trailer_frame(bytes(message.get("body", b"")))}
            if self._held_status:
                await self._send(message)
                message = {
                    "type": "http.response.trailers",
                    "headers": self._held_status,
                    "more_trailers": False,
                }
        await self._send(message)

    async def _unimplemented(self, text: str) -> None:
        status = [(GRPC_STATUS, UNIMPLEMENTED), (GRPC_MESSAGE, spec_percent_encode(text.encode()))]
        start = {"type": "http.response.start", "status": 200, "trailers": False}
        await self.send({**start, "headers": [(b"content-type", self._content_type), *status]})
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})


def _json_message(body: bytes) -> str:
    """The `message` of a Connect-style JSON error body, if it is one."""
    try:
        payload = json.loads(body)
    except ValueError:
        return ""
    message = payload.get("message", "") if isinstance(payload, dict) else ""
    return message if isinstance(message, str) else ""


def _content_type(scope: Scope) -> bytes:
    return bytes(next((v for k, v in scope.get("headers", []) if k.lower() == b"content-type"), b""))
