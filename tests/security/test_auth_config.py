"""Settings that would serve insecurely are refused at start-up (exit 2, a one-line reason), and an
UNAUTHENTICATED call does not take its HTTP/2 connection down with it."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from metald.api.auth import ConfigError, build_authenticator
from metald.api.serve import tls_context
from metald.gen.vmprovisioner.v1 import vm_pb as pb
from metald.settings import Settings
from tests.security.pki import JwtKeys, Pki
from tests.support.daemon import METALD, REPO, Daemon, free_port
from tests.support.rpc import SERVICE, token


def _serve(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*METALD, "serve", "--data-dir", str(data_dir), "--no-network-enabled", "--accel", "tcg", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def _jwks(path: Path, *keys: dict[str, object]) -> Path:
    path.write_text(json.dumps({"keys": list(keys)}) if keys else "[]")
    return path


def _refusals(tmp_path: Path, pki: Pki, keys: JwtKeys) -> dict[str, tuple[dict[str, Any], str]]:
    rs = jwt.algorithms.RSAAlgorithm
    weak = rsa.generate_private_key(65537, 1024)
    tls = {"tls_cert": pki.server_cert, "tls_key": pki.server_key}
    public_rsa = json.loads(rs.to_jwk(keys.rsa_key.public_key()))
    return {
        "dev mode on a public bind": ({"listen": "0.0.0.0:8080"}, "auth_mode=dev on non-loopback address"),
        "jwt without keys": ({"auth_mode": "jwt"}, "needs jwt_secret"),
        "short HS256 secret": ({"auth_mode": "jwt", "jwt_secret": "short"}, "at least 32 bytes"),
        "symmetric key in the JWKS": (
            {
                "auth_mode": "jwt",
                "jwt_jwks_file": _jwks(tmp_path / "oct.json", {"kty": "oct", "k": "c2VjcmV0"}),
            },
            "only RSA keys for RS256",
        ),
        "private key in the JWKS": (
            {
                "auth_mode": "jwt",
                "jwt_jwks_file": _jwks(tmp_path / "d.json", json.loads(rs.to_jwk(keys.rsa_key))),
            },
            "private key material",
        ),
        "RSA key of 1024 bits": (
            {
                "auth_mode": "jwt",
                "jwt_jwks_file": _jwks(tmp_path / "weak.json", json.loads(rs.to_jwk(weak.public_key()))),
            },
            "at least 2048 bits",
        ),
        "RSA key for another algorithm": (
            {
                "auth_mode": "jwt",
                "jwt_jwks_file": _jwks(tmp_path / "ps.json", {**public_rsa, "alg": "PS256"}),
            },
            "only RSA keys for RS256",
        ),
        "encryption key in the JWKS": (
            {"auth_mode": "jwt", "jwt_jwks_file": _jwks(tmp_path / "enc.json", {**public_rsa, "use": "enc"})},
            "use must be 'sig'",
        ),
        "not a JWKS": ({"auth_mode": "jwt", "jwt_jwks_file": _jwks(tmp_path / "x.json")}, "not a JWKS"),
        "mtls without a client CA": (
            {"auth_mode": "mtls", **tls},
            "needs tls_cert, tls_key and tls_client_ca",
        ),
        "mtls without TLS": ({"auth_mode": "mtls", "tls_client_ca": pki.ca_path}, "needs tls_cert"),
        "client CA outside mtls": ({"tls_client_ca": pki.ca_path, **tls}, "only used with auth_mode=mtls"),
        "certificate without key": ({"tls_cert": pki.server_cert}, "go together"),
        "unreadable key": ({"tls_cert": pki.server_cert, "tls_key": Path("/nonexistent")}, "cannot load TLS"),
    }


def test_insecure_settings_are_refused(tmp_path: Path, pki: Pki, jwt_keys: JwtKeys) -> None:
    failures = []
    for name, (fields, reason) in _refusals(tmp_path, pki, jwt_keys).items():
        settings = Settings(**{"data_dir": tmp_path, "listen": "127.0.0.1:8080", **fields})
        try:
            build_authenticator(settings)
            tls_context(settings)
            failures.append(f"{name}: accepted")
        except ConfigError as exc:
            if reason not in str(exc):
                failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)


def test_the_cli_refuses_them_at_start_up(tmp_path: Path, pki: Pki, jwt_keys: JwtKeys) -> None:
    """Exit status 2 and the one-line reason, from the checks before anything is opened (dev mode)
    and from the TLS set-up after the store and backend are (an unreadable key)."""
    cases = ["dev mode on a public bind", "unreadable key"]
    refusals = _refusals(tmp_path, pki, jwt_keys)

    def serve(name: str) -> subprocess.CompletedProcess[str]:
        fields = {"listen": f"127.0.0.1:{free_port()}", **refusals[name][0]}
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in fields.items()]
        return _serve(tmp_path / name.replace(" ", "_"), *flags)

    with ThreadPoolExecutor(len(cases)) as pool:
        for name, result in zip(cases, pool.map(serve, cases), strict=True):
            assert result.returncode == 2, f"{name}: rc={result.returncode}\n{result.stderr[-2000:]}"
            assert refusals[name][1] in result.stderr, f"{name}: {result.stderr[-2000:]}"


def test_dev_mode_on_a_public_bind_needs_the_explicit_flag(tmp_path: Path) -> None:
    """With --insecure-dev-auth the refusal is lifted and a warning logged. The address (TEST-NET-1,
    never local) cannot be bound, so nothing is ever exposed: the daemon gets past auth, then fails."""
    result = _serve(tmp_path, "--listen=192.0.2.1:8080", "--insecure-dev-auth", "--log-format=text")
    assert "auth_mode=dev: development tokens (dev_customer_<id>) are accepted" in result.stderr
    assert "refused" not in result.stderr
    assert result.returncode != 0 and "192.0.2.1" in result.stderr


def test_refused_calls_leave_the_http2_connection_usable(daemon: Daemon) -> None:
    """hypercorn would drop an HTTP/2 connection receiving body DATA after an early answer."""
    with httpx.Client(base_url=daemon.url, http1=False, http2=True) as client:  # h2c, prior knowledge
        for i in range(6):
            good = i % 2 == 0
            resp = client.post(
                f"/{SERVICE}/ListVms",
                json={"page_size": 1},
                headers={"Authorization": f"Bearer {token('h2-ok') if good else 'nope'}"},
            )
            assert resp.http_version == "HTTP/2"
            assert resp.status_code == (200 if good else 401), resp.text
    with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        list_vms = channel.unary_unary(
            f"/{SERVICE}/ListVms",
            request_serializer=lambda m: m.to_binary(),
            response_deserializer=pb.ListVmsResponse.from_binary,
        )
        for i in range(6):
            metadata = [("authorization", f"Bearer {token('h2-ok')}" if i % 2 == 0 else "Bearer nope")]
            if i % 2 == 0:
                assert list_vms(pb.ListVmsRequest(page_size=1), metadata=metadata, timeout=30).vms == []
            else:
                with pytest.raises(grpc.RpcError) as caught:
                    list_vms(pb.ListVmsRequest(page_size=1), metadata=metadata, timeout=30)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
