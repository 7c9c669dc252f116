"""Short-lived gateway tokens: how a gateway proves itself to a host, per request, with the fleet secret.

`mgw1.<payload>.<mac>`: the payload (base64url JSON) names the customer, the host the token is for
and when it expires; the mac is HMAC-SHA256 over the prefix and the payload with a key derived
from the fleet secret. A token for one host is refused by every other, and nothing a customer
holds (a dev token, a JWT, a certificate) can take its place.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

from metald.domain.ids import CUSTOMER_ID_PATTERN

GATEWAY_TOKEN_PREFIX = "mgw1."
TOKEN_TTL_SECONDS = 60.0
CLOCK_SKEW_SECONDS = 30.0
MIN_SECRET_BYTES = 32


class InvalidGatewayToken(Exception):
    """Not a valid gateway token for this host (the caller maps it to UNAUTHENTICATED)."""


def load_fleet_secret(path: Path) -> bytes:
    """The fleet secret from its file (surrounding whitespace ignored); ValueError if too short."""
    secret = path.read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"fleet_secret_file {path}: the secret must be at least {MIN_SECRET_BYTES} bytes")
    return secret


def derive_key(secret: bytes, purpose: str) -> bytes:
    """One key per use of the fleet secret (gateway tokens, page tokens), never the secret itself."""
    return hmac.new(secret, f"metald-fleet:{purpose}".encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class GatewayTokens:
    def __init__(self, secret: bytes) -> None:
        self._key = derive_key(secret, "gateway-token")

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, (GATEWAY_TOKEN_PREFIX + payload).encode(), hashlib.sha256).digest())

    def mint(self, customer_id: str, host_id: str, now: float | None = None) -> str:
        expires = (time.time() if now is None else now) + TOKEN_TTL_SECONDS
        body = json.dumps({"c": customer_id, "h": host_id, "e": round(expires)}, separators=(",", ":"))
        payload = _b64(body.encode())
        return f"{GATEWAY_TOKEN_PREFIX}{payload}.{self._mac(payload)}"

    def verify(self, token: str, host_id: str, now: float | None = None) -> str:
        """The customer a valid token for `host_id` names; InvalidGatewayToken otherwise."""
        payload, _, mac = token.removeprefix(GATEWAY_TOKEN_PREFIX).partition(".")
        if not token.startswith(GATEWAY_TOKEN_PREFIX) or not hmac.compare_digest(mac, self._mac(payload)):
            raise InvalidGatewayToken("bad signature")
        try:
            claims = json.loads(_unb64(payload))
            customer, audience, expires = str(claims["c"]), str(claims["h"]), float(claims["e"])
        except (ValueError, KeyError, TypeError):
            raise InvalidGatewayToken("malformed") from None
        current = time.time() if now is None else now
        if audience != host_id or expires < current - CLOCK_SKEW_SECONDS:
            raise InvalidGatewayToken("expired or for another host")
        if expires > current + TOKEN_TTL_SECONDS + CLOCK_SKEW_SECONDS:
            raise InvalidGatewayToken("lives too long")
        if not CUSTOMER_ID_PATTERN.fullmatch(customer):
            raise InvalidGatewayToken("bad customer id")
        return customer
