"""auth_mode=jwt over TLS: only a well-signed, current token for this audience and issuer names a
customer; every other token is the same UNAUTHENTICATED, and no token reaches the log."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import time
import uuid
from typing import Any

import grpc
import httpx
import jwt
import pytest

from metald.gen.vmprovisioner.v1 import vm_pb as pb
from tests.security.conftest import TlsDaemon
from tests.security.pki import JwtKeys, Pki
from tests.support.rpc import SERVICE

UNAUTHENTICATED = {"code": "unauthenticated", "message": "missing or invalid credentials"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(customer: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"tenant": customer, "aud": "metald", "iss": "https://issuer.test", "iat": now, "exp": now + 300}
    return {k: v for k, v in {**base, **overrides}.items() if v is not None}


def hs256(keys: JwtKeys, payload: dict[str, Any], **header: Any) -> str:
    return jwt.encode(payload, keys.secret, algorithm="HS256", headers=header or None)


def hand_signed(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A token built by hand, for what no JWT library will sign (alg none, PEM as HMAC secret)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def call(
    daemon: TlsDaemon, pki: Pki, token: str | None, method: str = "ListVms", body: Any = None
) -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.post(
        f"{daemon.url}/{SERVICE}/{method}", json=body or {}, headers=headers, verify=pki.context()
    )


@pytest.fixture
def customer() -> str:
    return "jwt-" + uuid.uuid4().hex[:10]


def test_valid_tokens_of_each_algorithm_name_the_customer(
    jwt_daemon: TlsDaemon, pki: Pki, jwt_keys: JwtKeys, customer: str
) -> None:
    payload = claims(customer)
    tokens = [
        hs256(jwt_keys, payload),
        hs256(jwt_keys, payload, kid="any"),  # the one secret, whatever kid the issuer puts
        jwt.encode(payload, jwt_keys.rsa_key, algorithm="RS256", headers={"kid": "rsa-1"}),
        jwt.encode(payload, jwt_keys.rsa_key, algorithm="RS256"),  # no kid: the only RS256 key
        jwt.encode(payload, jwt_keys.ec_key, algorithm="ES256", headers={"kid": "ec-1"}),
    ]
    vm_id = call(jwt_daemon, pki, tokens[0], "CreateVm", {"config": {}}).json()["vm_id"]
    try:
        for token in tokens:
            resp = call(jwt_daemon, pki, token)
            assert resp.status_code == 200, resp.text
            assert [v["vm_id"] for v in resp.json()["vms"]] == [vm_id]
        other = call(jwt_daemon, pki, hs256(jwt_keys, claims("x" + customer)))
        assert other.status_code == 200 and other.json().get("vms", []) == []
    finally:
        call(jwt_daemon, pki, tokens[0], "DeleteVm", {"vm_id": vm_id, "force": True})


def test_clock_skew_is_tolerated_up_to_the_leeway_only(
    jwt_daemon: TlsDaemon, pki: Pki, jwt_keys: JwtKeys, customer: str
) -> None:
    now = int(time.time())
    assert call(jwt_daemon, pki, hs256(jwt_keys, claims(customer, exp=now - 2))).status_code == 200
    assert call(jwt_daemon, pki, hs256(jwt_keys, claims(customer, nbf=now + 2))).status_code == 200
    assert call(jwt_daemon, pki, hs256(jwt_keys, claims(customer, exp=now - 30))).status_code == 401
    assert call(jwt_daemon, pki, hs256(jwt_keys, claims(customer, nbf=now + 30))).status_code == 401


def _bad_tokens(keys: JwtKeys, customer: str) -> dict[str, str]:
    now = int(time.time())
    good = hs256(keys, claims(customer))
    head, _, sig = good.split(".")
    forged_payload = b64(json.dumps(claims("victim")).encode())
    none_header = {"alg": "none", "typ": "JWT"}
    return {
        "expired": hs256(keys, claims(customer, exp=now - 60, iat=now - 120)),
        "not yet valid": hs256(keys, claims(customer, nbf=now + 120)),
        "issued in the future": hs256(keys, claims(customer, iat=now + 120)),
        "no exp": hs256(keys, claims(customer, exp=None)),
        "wrong audience": hs256(keys, claims(customer, aud="someone-else")),
        "no audience": hs256(keys, claims(customer, aud=None)),
        "wrong issuer": hs256(keys, claims(customer, iss="https://evil.test")),
        "no issuer": hs256(keys, claims(customer, iss=None)),
        "no customer claim": hs256(keys, claims(customer, tenant=None)),
        "customer claim not an id": hs256(keys, claims("../../etc")),
        "customer claim not a string": hs256(keys, claims(customer, tenant=["a", "b"])),
        "wrong HS256 secret": jwt.encode(claims(customer), "w" * 48, algorithm="HS256"),
        "unpublished RSA key": jwt.encode(
            claims(customer), keys.unpublished, algorithm="RS256", headers={"kid": "rsa-1"}
        ),
        "RS256 signed, kid of the EC key": jwt.encode(
            claims(customer), keys.rsa_key, algorithm="RS256", headers={"kid": "ec-1"}
        ),
        "unknown kid": jwt.encode(
            claims(customer), keys.rsa_key, algorithm="RS256", headers={"kid": "rsa-9"}
        ),
        "RS512 (not allowed)": jwt.encode(claims(customer), keys.rsa_key, algorithm="RS512"),
        "HS512 (not allowed)": jwt.encode(claims(customer), keys.secret, algorithm="HS512"),
        "alg none": hand_signed(none_header, claims(customer), None),
        "alg None": hand_signed({"alg": "None"}, claims(customer), None),
        "alg none with a good signature": f"{b64(json.dumps(none_header).encode())}.{good.split('.')[1]}.{sig}",
        "HS256 with the RSA public key as secret": hand_signed(
            {"alg": "HS256", "typ": "JWT"}, claims(customer), keys.rsa_public_pem()
        ),
        "HS256 with the RSA public key, kid rsa-1": hand_signed(
            {"alg": "HS256", "kid": "rsa-1"}, claims(customer), keys.rsa_public_pem()
        ),
        "tampered payload": f"{head}.{forged_payload}.{sig}",
        "signature stripped": f"{head}.{good.split('.')[1]}.",
        "dev token": f"dev_customer_{customer}",
        "garbage": "not.a.jwt",
        "oversized": good + "A" * 9000,
    }


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # HS512 with the HS256 secret
def test_every_bad_token_is_the_same_unauthenticated(
    jwt_daemon: TlsDaemon, pki: Pki, jwt_keys: JwtKeys, customer: str
) -> None:
    bad = _bad_tokens(jwt_keys, customer)
    for name, token in bad.items():
        resp = call(jwt_daemon, pki, token, "CreateVm", {"config": {}})
        assert resp.status_code == 401, f"{name}: {resp.status_code} {resp.text}"
        assert {k: resp.json()[k] for k in UNAUTHENTICATED} == UNAUTHENTICATED, name
    assert call(jwt_daemon, pki, None).status_code == 401
    good = call(jwt_daemon, pki, hs256(jwt_keys, claims(customer)))
    assert good.status_code == 200 and good.json().get("vms", []) == [], "no bad token created a VM"
    logs = jwt_daemon.logs()
    for name, token in bad.items():
        secret_parts = [token, *(p for p in token.split(".") if len(p) >= 16)]
        assert not any(part in logs for part in secret_parts), f"{name}: token in the log"


def test_grpcio_over_tls_with_a_jwt(
    jwt_daemon: TlsDaemon, pki: Pki, jwt_keys: JwtKeys, customer: str
) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca_path.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{jwt_daemon.port}", credentials) as channel:
        list_vms = channel.unary_unary(
            f"/{SERVICE}/ListVms",
            request_serializer=lambda m: m.to_binary(),
            response_deserializer=pb.ListVmsResponse.from_binary,
        )
        token = hs256(jwt_keys, claims(customer))
        assert (
            list_vms(pb.ListVmsRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=30).vms
            == []
        )
        with pytest.raises(grpc.RpcError) as caught:
            list_vms(pb.ListVmsRequest(), metadata=[("authorization", f"Bearer {token}x")], timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert caught.value.details() == UNAUTHENTICATED["message"]


def test_tls_negotiates_h2_and_http11_by_alpn(
    jwt_daemon: TlsDaemon, pki: Pki, jwt_keys: JwtKeys, customer: str
) -> None:
    for offered, expected in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")):
        context = pki.context()
        context.set_alpn_protocols(offered)
        with (
            socket.create_connection(("127.0.0.1", jwt_daemon.port)) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.selected_alpn_protocol() == expected
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with httpx.Client(http2=True, verify=pki.context()) as client:
        resp = client.post(
            f"{jwt_daemon.url}/{SERVICE}/ListVms",
            json={},
            headers={"Authorization": f"Bearer {hs256(jwt_keys, claims(customer))}"},
        )
    assert resp.status_code == 200 and resp.http_version == "HTTP/2"
    with pytest.raises(httpx.HTTPError):  # no cleartext on the TLS port
        httpx.get(f"http://127.0.0.1:{jwt_daemon.port}/health", timeout=5)
