"""Who is calling: the customer id from a dev token, a JWT or a TLS client certificate, and nothing else.

Every failure is the same UNAUTHENTICATED answer, and no token value is ever logged.
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.ids import CUSTOMER_ID_PATTERN
from metald.fleet.tokens import GATEWAY_TOKEN_PREFIX, GatewayTokens, InvalidGatewayToken
from metald.settings import Settings

log = logging.getLogger("metald.auth")

DEV_TOKEN_PREFIX = "dev_customer_"
MAX_TOKEN_LENGTH = 8192
MIN_HS256_SECRET_BYTES = 32
MIN_RSA_BITS = 2048
# A client certificate names its customer with this URI SAN (any SPIFFE trust domain the client CA
# vouches for), or, when it has no URI SAN at all, with its subject CN.
SPIFFE_CUSTOMER = re.compile(r"spiffe://[a-z0-9._-]+/customer/(" + CUSTOMER_ID_PATTERN.pattern + ")")


class ConfigError(Exception):
    """The settings cannot be served as given."""


def unauthenticated() -> MetaldError:
    """The same answer for every auth failure: callers learn nothing about which check failed."""
    return MetaldError(ErrorCode.UNAUTHENTICATED, "missing or invalid credentials", reason="UNAUTHENTICATED")


@dataclass(frozen=True)
class Peer:
    """What the transport knows about the connection a request came on."""

    tls_client_cert: bytes | None = None  # DER of a client certificate the TLS layer verified


NO_PEER_FACTS = Peer()
# Set per connection by the TLS layer (metald.api.serve); read by the AuthInterceptor.
current_peer: contextvars.ContextVar[Peer] = contextvars.ContextVar("current_peer", default=NO_PEER_FACTS)


class Authenticator(Protocol):
    def authenticate(self, headers: Mapping[str, str], peer: Peer) -> str:
        """The caller's customer id; raises UNAUTHENTICATED."""


def bearer_token(headers: Mapping[str, str]) -> str:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_LENGTH:
        raise unauthenticated()
    return token


def _customer(value: object) -> str:
    if not isinstance(value, str) or not CUSTOMER_ID_PATTERN.fullmatch(value):
        raise unauthenticated()
    return value


class DevTokenAuthenticator:
    """`Authorization: Bearer dev_customer_<id>`: development only; every use is logged loudly once."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def authenticate(self, headers: Mapping[str, str], peer: Peer) -> str:
        token = bearer_token(headers)
        if not token.startswith(DEV_TOKEN_PREFIX):
            raise unauthenticated()
        customer = _customer(token[len(DEV_TOKEN_PREFIX) :])
        if customer not in self._warned and len(self._warned) < 1000:
            self._warned.add(customer)
            log.warning(
                "accepted a development token (auth_mode=dev): not for production",
                extra={"customer_id": customer},
            )
        return customer


# ---- JWT ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyKey:
    """A key pinned to the one algorithm it may verify: the token's `alg` header only selects a
    key, it never chooses how a key is used (no `none`, no RS256 public key used as HMAC secret)."""

    algorithm: str
    key: Any  # bytes for HS256, a cryptography public key for RS256/ES256
    kid: str | None = None  # None (the HS256 secret): whatever kid the token names


def load_jwks(path: Path) -> list[VerifyKey]:
    """Public RS256 (RSA >= 2048 bits) and ES256 (P-256) keys of a JWKS file; anything else is refused."""
    try:
        document = json.loads(path.read_text())
        entries = document["keys"]
        if not isinstance(entries, list):
            raise TypeError("keys is not a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"jwt_jwks_file {path}: not a JWKS document ({exc})") from None
    keys = [_jwk(entry, f"jwt_jwks_file {path}: key {i}") for i, entry in enumerate(entries)]
    kids = [k.kid for k in keys if k.kid]
    if len(kids) != len(set(kids)):
        raise ConfigError(f"jwt_jwks_file {path}: duplicate kid")
    return keys


def _jwk(entry: object, where: str) -> VerifyKey:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: not a JSON object")
    if "d" in entry:
        raise ConfigError(f"{where}: contains private key material; publish only public keys")
    if entry.get("use", "sig") != "sig":
        raise ConfigError(f"{where}: use must be 'sig'")
    kty = entry.get("kty")
    algorithm = {"RSA": "RS256", "EC": "ES256"}.get(kty) if isinstance(kty, str) else None
    if algorithm is None or entry.get("alg", algorithm) != algorithm:
        raise ConfigError(f"{where}: only RSA keys for RS256 and EC P-256 keys for ES256 are accepted")
    try:
        key = jwt.PyJWK(entry, algorithm).key
    except jwt.PyJWTError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"{where}: RSA keys must have at least {MIN_RSA_BITS} bits")
    elif not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)):
        raise ConfigError(f"{where}: ES256 needs a P-256 public key")
    kid = entry.get("kid", "")
    if not isinstance(kid, str):
        raise ConfigError(f"{where}: kid must be a string")
    return VerifyKey(algorithm, key, kid)


class JwtAuthenticator:
    """`Authorization: Bearer <JWT>`: HS256 with the shared secret, or RS256/ES256 with a JWKS key
    (chosen by `kid`, or the only key of the token's algorithm). `exp` is required; `nbf` and
    `iat` are checked when present; `aud`/`iss` when configured; all within `leeway` seconds."""

    def __init__(
        self,
        keys: list[VerifyKey],
        *,
        audience: str,
        issuer: str,
        customer_claim: str,
        leeway: int,
    ) -> None:
        self._keys = keys
        self._audience = audience or None
        self._issuer = issuer or None
        self._claim = customer_claim
        self._leeway = leeway

    def authenticate(self, headers: Mapping[str, str], peer: Peer) -> str:
        token = bearer_token(headers)
        try:
            key = self._key_for(jwt.get_unverified_header(token))
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp"], "verify_aud": self._audience is not None},
            )
        except (jwt.PyJWTError, ValueError, TypeError) as exc:  # garbage must not become INTERNAL
            log.debug("JWT refused: %s", type(exc).__name__)
            raise unauthenticated() from None
        return _customer(claims.get(self._claim))

    def _key_for(self, header: dict[str, Any]) -> VerifyKey:
        algorithm, kid = header.get("alg"), header.get("kid")
        candidates = [
            k for k in self._keys if k.algorithm == algorithm and (kid is None or k.kid in (None, kid))
        ]
        if len(candidates) != 1:
            raise jwt.InvalidKeyError("no single key for this token")
        return candidates[0]


def jwt_keys(settings: Settings) -> list[VerifyKey]:
    keys: list[VerifyKey] = []
    if settings.jwt_secret:
        secret = settings.jwt_secret.encode()
        if len(secret) < MIN_HS256_SECRET_BYTES:
            raise ConfigError(f"jwt_secret must be at least {MIN_HS256_SECRET_BYTES} bytes")
        keys.append(VerifyKey("HS256", secret))
    if settings.jwt_jwks_file:
        keys += load_jwks(settings.jwt_jwks_file)
    if not keys:
        raise ConfigError("auth_mode=jwt needs jwt_secret (HS256) or jwt_jwks_file (RS256/ES256 keys)")
    return keys


# ---- mTLS ---------------------------------------------------------------------------------------


def customer_from_certificate(der: bytes) -> str:
    """The customer a verified client certificate names: its one `spiffe://<domain>/customer/<id>`
    URI SAN; a certificate with URI SANs but not exactly one such id is refused; a certificate
    without URI SANs is named by its single subject CN."""
    try:
        cert = x509.load_der_x509_certificate(der)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        raise unauthenticated() from None
    if uris:
        ids = {m.group(1) for uri in uris if (m := SPIFFE_CUSTOMER.fullmatch(uri))}
        if len(ids) != 1:
            raise unauthenticated()
        return ids.pop()
    if len(common_names) != 1:
        raise unauthenticated()
    return _customer(common_names[0].value)


class MtlsAuthenticator:
    """The customer named by the client certificate the TLS layer verified against tls_client_ca.
    Headers are ignored: a bearer token (dev or JWT) never stands in for a certificate."""

    def authenticate(self, headers: Mapping[str, str], peer: Peer) -> str:
        if peer.tls_client_cert is None:
            raise unauthenticated()
        return customer_from_certificate(peer.tls_client_cert)


# ---- configuration ------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_tls_settings(settings: Settings) -> None:
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("tls_cert and tls_key go together")
    if settings.auth_mode == "mtls" and not (settings.tls_cert and settings.tls_client_ca):
        raise ConfigError("auth_mode=mtls needs tls_cert, tls_key and tls_client_ca")
    if settings.tls_client_ca and settings.auth_mode != "mtls":
        raise ConfigError("tls_client_ca is only used with auth_mode=mtls")


def build_authenticator(settings: Settings) -> Authenticator:
    """The authenticator for settings.auth_mode; ConfigError for unsafe or incomplete settings."""
    _check_tls_settings(settings)
    host, _ = settings.host_port
    if settings.auth_mode == "dev":
        if not is_loopback(host) and not settings.insecure_dev_auth:
            raise ConfigError(
                f"auth_mode=dev on non-loopback address {host}: refused "
                "(use jwt/mtls, or --insecure-dev-auth to accept the risk)"
            )
        log.warning("auth_mode=dev: development tokens (dev_customer_<id>) are accepted")
        return DevTokenAuthenticator()
    if settings.auth_mode == "mtls":
        return MtlsAuthenticator()
    if not settings.tls_cert and not is_loopback(host):
        log.warning("auth_mode=jwt without TLS on %s: bearer tokens travel in cleartext", host)
    return JwtAuthenticator(
        jwt_keys(settings),
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        customer_claim=settings.jwt_customer_claim,
        leeway=settings.jwt_leeway_seconds,
    )


# ---- fleet hosts --------------------------------------------------------------------------------


class FleetHostAuthenticator:
    """A host in fleet mode: a gateway token (signed with the fleet secret, for this host) names the
    customer; customer credentials count only when direct calls are allowed (`direct`), and are
    never taken for a gateway token."""

    def __init__(self, tokens: GatewayTokens, host_id: str, direct: Authenticator | None) -> None:
        self._tokens = tokens
        self._host_id = host_id
        self._direct = direct

    def authenticate(self, headers: Mapping[str, str], peer: Peer) -> str:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip().startswith(GATEWAY_TOKEN_PREFIX):
            try:
                return self._tokens.verify(token.strip()[:MAX_TOKEN_LENGTH], self._host_id)
            except InvalidGatewayToken as exc:
                log.debug("gateway token refused: %s", exc)
                raise unauthenticated() from None
        if self._direct is None:
            raise unauthenticated()
        return self._direct.authenticate(headers, peer)


def build_host_authenticator(settings: Settings, fleet_secret: bytes | None) -> Authenticator:
    """build_authenticator's, or in fleet mode (a fleet secret) the FleetHostAuthenticator around it."""
    if fleet_secret is None:
        return build_authenticator(settings)
    direct = build_authenticator(settings) if settings.fleet_allow_direct_calls else None
    if direct is None:
        _check_tls_settings(settings)
    return FleetHostAuthenticator(GatewayTokens(fleet_secret), settings.fleet_host_id, direct)
