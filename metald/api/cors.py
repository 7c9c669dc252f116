"""CORS for browser clients (Connect and gRPC-Web from a web console), for configured origins only
(`cors_allowed_origins`; empty, the default: no CORS headers at all, preflights refused as before).

Preflights (OPTIONS with Access-Control-Request-Method) from an allowed origin are answered 204
here; actual requests get Access-Control-Allow-Origin and the response headers browsers must be
allowed to read (gRPC status trailers, Connect and request-id headers). Credentials are bearer
tokens in a header, never cookies, so Access-Control-Allow-Credentials is not sent.
"""

from __future__ import annotations

from metald.api.asgi import ASGIApp, Message, Receive, Scope, Send, headers_of

ALLOW_METHODS = b"GET, POST, OPTIONS"
ALLOW_HEADERS = (
    b"authorization, content-type, connect-protocol-version, connect-timeout-ms, connect-content-encoding, "
    b"connect-accept-encoding, grpc-timeout, grpc-encoding, grpc-accept-encoding, x-grpc-web, x-user-agent, "
    b"x-request-id, traceparent, tracestate"
)
EXPOSE_HEADERS = (
    b"grpc-status, grpc-message, grpc-status-details-bin, grpc-encoding, grpc-accept-encoding, "
    b"connect-content-encoding, connect-accept-encoding, content-encoding, x-request-id, "
    b"x-console-offset, x-console-size"
)
MAX_AGE = b"7200"


def parse_origins(setting: str) -> frozenset[str]:
    return frozenset(o.strip().rstrip("/") for o in setting.split(",") if o.strip())


class Cors:
    def __init__(self, app: ASGIApp, origins: frozenset[str]) -> None:
        self._app = app
        self._origins = origins

    def _allowed(self, origin: str) -> bool:
        return bool(origin) and (origin in self._origins or "*" in self._origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._origins:
            await self._app(scope, receive, send)
            return
        headers = headers_of(scope)
        origin = headers.get("origin", "")
        if not self._allowed(origin):
            await self._app(scope, receive, send)
            return
        allow = [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await send(
                {
                    "type": "http.response.start",
                    "status": 204,
                    "headers": [
                        *allow,
                        (b"access-control-allow-methods", ALLOW_METHODS),
                        (b"access-control-allow-headers", ALLOW_HEADERS),
                        (b"access-control-max-age", MAX_AGE),
                        (b"content-length", b"0"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return

        async def cors_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [*allow, (b"access-control-expose-headers", EXPOSE_HEADERS)]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self._app(scope, receive, cors_send)
