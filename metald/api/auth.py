"""Who is calling: bearer-token authentication yielding the customer id, and nothing else."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from typing import Protocol

from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.ids import CUSTOMER_ID_PATTERN
from metald.settings import Settings

log = logging.getLogger("metald.auth")

DEV_TOKEN_PREFIX = "dev_customer_"


class ConfigError(Exception):
    """The settings cannot be served as given."""


def unauthenticated() -> MetaldError:
    """The same answer for every auth failure: callers learn nothing about which check failed."""
    return MetaldError(ErrorCode.UNAUTHENTICATED, "missing or invalid credentials", reason="UNAUTHENTICATED")


class Authenticator(Protocol):
    def authenticate(self, headers: Mapping[str, str], peer: Mapping[str, object]) -> str:
        """The caller's customer id; raises UNAUTHENTICATED."""


def bearer_token(headers: Mapping[str, str]) -> str:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthenticated()
    return token.strip()


class DevTokenAuthenticator:
    """`Authorization: Bearer dev_customer_<id>`: development only; every use is logged loudly once."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def authenticate(self, headers: Mapping[str, str], peer: Mapping[str, object]) -> str:
        token = bearer_token(headers)
        if not token.startswith(DEV_TOKEN_PREFIX):
            raise unauthenticated()
        customer = token[len(DEV_TOKEN_PREFIX) :]
        if not CUSTOMER_ID_PATTERN.fullmatch(customer):
            raise unauthenticated()
        if customer not in self._warned and len(self._warned) < 1000:
            self._warned.add(customer)
            log.warning(
                "accepted a development token (auth_mode=dev): not for production",
                extra={"customer_id": customer},
            )
        return customer


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_authenticator(settings: Settings) -> Authenticator:
    host, _ = settings.host_port
    if settings.auth_mode == "dev":
        if not is_loopback(host) and not settings.insecure_dev_auth:
            raise ConfigError(
                f"auth_mode=dev on non-loopback address {host}: refused "
                "(use jwt/mtls, or --insecure-dev-auth to accept the risk)"
            )
        log.warning("auth_mode=dev: development tokens (dev_customer_<id>) are accepted")
        return DevTokenAuthenticator()
    raise ConfigError(f"auth_mode={settings.auth_mode} is not available yet")
