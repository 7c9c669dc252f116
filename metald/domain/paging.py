"""Opaque, tamper-proof ListVms page tokens (keyset: the last seq served, bound to the caller)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from metald.domain.errors import invalid


class PageTokens:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:16]

    def encode(self, customer_id: str, filter_key: str, after_seq: int) -> str:
        payload = json.dumps({"c": customer_id, "f": filter_key, "s": after_seq}, separators=(",", ":"))
        raw = payload.encode()
        return base64.urlsafe_b64encode(self._mac(raw) + raw).decode().rstrip("=")

    def decode(self, token: str, customer_id: str, filter_key: str) -> int:
        """The seq to continue after; INVALID_ARGUMENT for a forged, foreign or stale-filter token."""
        try:
            blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except ValueError:
            raise invalid("page_token", "malformed page token") from None
        mac, raw = blob[:16], blob[16:]
        if len(mac) != 16 or not hmac.compare_digest(mac, self._mac(raw)):
            raise invalid("page_token", "invalid page token")
        data = json.loads(raw)
        if data.get("c") != customer_id:
            raise invalid("page_token", "page token belongs to another caller")
        if data.get("f") != filter_key:
            raise invalid("page_token", "page token was issued for another state_filter")
        return int(data["s"])
