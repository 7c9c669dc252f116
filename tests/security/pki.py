"""Throwaway keys made at test time: a client CA, a rogue CA, server and client certificates, and
JWT signing keys with their JWKS. Nothing here is ever committed."""

from __future__ import annotations

import datetime as dt
import json
import ssl
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Ca:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert)

    def issue(
        self,
        directory: Path,
        stem: str,
        *,
        cn: str | None = None,
        uris: tuple[str, ...] = (),
        server: bool = False,
    ) -> tuple[Path, Path]:
        """(cert.pem, key.pem) of a leaf signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(names))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        if server:
            sans += [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=not names)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)
        return cert_path, key_path

    def write(self, directory: Path) -> Path:
        path = directory / f"{self.name}.crt"
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path


@dataclass
class Pki:
    """A CA for the server and trusted clients, a rogue CA nobody trusts, and the server's cert."""

    directory: Path
    ca: Ca = field(default_factory=lambda: Ca.create("metald-test-ca"))
    rogue: Ca = field(default_factory=lambda: Ca.create("rogue-ca"))

    def __post_init__(self) -> None:
        self.ca_path = self.ca.write(self.directory)
        self.server_cert, self.server_key = self.ca.issue(
            self.directory, "server", cn="localhost", server=True
        )

    def context(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        """A client context trusting the test CA, presenting `cert` if given."""
        context = ssl.create_default_context(cafile=str(self.ca_path))
        if cert is not None:
            context.load_cert_chain(*cert)
        return context

    def client(
        self, stem: str, *, cn: str | None = None, uris: tuple[str, ...] = (), rogue: bool = False
    ) -> tuple[Path, Path]:
        return (self.rogue if rogue else self.ca).issue(self.directory, stem, cn=cn, uris=uris)


@dataclass
class JwtKeys:
    """An HS256 secret, an RS256 and an ES256 key pair (published in a JWKS file), and an RSA key
    that is not published."""

    directory: Path
    secret: str = "s3cret-" + "x" * 40
    rsa_key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))
    ec_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    unpublished: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))

    def __post_init__(self) -> None:
        keys = []
        for kid, key, alg in (("rsa-1", self.rsa_key, "RS256"), ("ec-1", self.ec_key, "ES256")):
            jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": alg})
        self.jwks_path = self.directory / "jwks.json"
        self.jwks_path.write_text(json.dumps({"keys": keys}))

    def rsa_public_pem(self) -> bytes:
        return self.rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
