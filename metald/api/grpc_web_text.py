"""gRPC-Web text mode (`application/grpc-web-text`, the grpc-web npm client's default): the same
frames as binary gRPC-Web, base64-encoded both ways. Translated here to binary gRPC-Web for the
runtime, which serves only the binary form. Each response part is encoded on its own (padded), so
a streamed event reaches the browser at once; the grpc-web client decodes 4-character groups, as
the spec allows."""

from __future__ import annotations

import base64
import binascii

from metald.api.asgi import ASGIApp, Message, Receive, Scope, Send

TEXT = b"application/grpc-web-text"
BINARY = b"application/grpc-web"


class Base64Stream:
    """Decodes base64 text arriving in arbitrary pieces, padded segments included."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, text: bytes) -> bytes:
        data = self._pending + bytes(text).translate(None, b" \t\r\n")
        whole = len(data) - len(data) % 4
        self._pending = data[whole:]
        if b"=" not in data[:whole]:
            return base64.b64decode(data[:whole])
        return b"".join(base64.b64decode(data[i : i + 4]) for i in range(0, whole, 4))

    def end(self) -> None:
        if self._pending:
            raise binascii.Error("truncated base64 body")


def _retyped(headers: list[tuple[bytes, bytes]], old: bytes, new: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for key, value in headers:
        name = key.lower()
        if name == b"content-type" and value.startswith(old):
            value = new + value[len(old) :]
        elif name == b"content-length":
            continue  # the length changes with the encoding
        out.append((key, value))
    return out


class GrpcWebText:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = list(scope.get("headers", []))
        content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
        if scope["type"] != "http" or not content_type.startswith(TEXT):
            await self._app(scope, receive, send)
            return
        scope = {**scope, "headers": _retyped(headers, TEXT, BINARY)}
        decoder = Base64Stream()

        async def decoding_receive() -> Message:
            message = await receive()
            if message["type"] != "http.request":
                return message
            try:
                body = decoder.feed(message.get("body", b""))
                if not message.get("more_body", False):
                    decoder.end()
            except (binascii.Error, ValueError):
                body = b"\xff"  # not a frame: the runtime answers INVALID_ARGUMENT as for any bad frame
            return {**message, "body": body}

        async def encoding_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": _retyped(list(message.get("headers", [])), BINARY, TEXT)}
            elif message["type"] == "http.response.body" and message.get("body"):
                message = {**message, "body": base64.b64encode(message["body"])}
            await send(message)

        await self._app(scope, decoding_receive, encoding_send)
