"""HTTP statuses as the reference's error table gives them, over Connect's own mapping.

Connect maps failed_precondition to HTTP 400; the reference promises 412. Connect clients read
the code from the JSON error body, so only the status line changes. gRPC and gRPC-Web answer 200
with the code in trailers and are left alone.
"""

from __future__ import annotations

import json

from metald.api.asgi import ASGIApp, Message, Receive, Scope, Send

_OVERRIDES = {"failed_precondition": 412}


class ReferenceStatusMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        held: Message | None = None

        async def send_with_status(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] == 400:
                held = message  # wait for the body to learn the code
                return
            if held is not None and message["type"] == "http.response.body":
                start, held = held, None
                try:
                    code = json.loads(message.get("body", b"") or b"{}").get("code")
                except (ValueError, AttributeError):
                    code = None
                if code in _OVERRIDES:
                    start = {**start, "status": _OVERRIDES[code]}
                await send(start)
            await send(message)

        await self._app(scope, receive, send_with_status)
