"""Fleet settings, checked once at start-up (a ConfigError names what is missing or wrong)."""

from __future__ import annotations

import re

from metald.api.auth import ConfigError
from metald.fleet.tokens import load_fleet_secret
from metald.settings import Settings

HOST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def fleet_secret(settings: Settings) -> bytes:
    if not settings.fleet_secret_file:
        raise ConfigError("fleet mode (fleet_dsn) needs fleet_secret_file")
    try:
        return load_fleet_secret(settings.fleet_secret_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"fleet_secret_file: {exc}") from None


def host_fleet_secret(settings: Settings) -> bytes | None:
    """The fleet secret of a host in fleet mode after checking its other fleet settings; None for a
    lone host."""
    if not settings.fleet_dsn:
        return None
    if not HOST_ID_PATTERN.fullmatch(settings.fleet_host_id):
        raise ConfigError("fleet mode needs fleet_host_id: letters, digits, '.', '_', '-' (at most 63)")
    if not re.fullmatch(r"https?://[^/\s]+", settings.fleet_advertise_url):
        raise ConfigError("fleet mode needs fleet_advertise_url as http://ADDR:PORT (no path)")
    return fleet_secret(settings)


def gateway_fleet_secret(settings: Settings) -> bytes:
    if not settings.fleet_dsn:
        raise ConfigError("metald gateway needs fleet_dsn")
    return fleet_secret(settings)
