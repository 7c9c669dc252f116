"""auth_mode=mtls: the customer is the one a client certificate from tls_client_ca names; no
certificate, a certificate from another CA, or one naming no single customer gets nothing."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from metald.gen.vmprovisioner.v1 import vm_pb as pb
from tests.security.conftest import TlsDaemon
from tests.security.pki import Pki
from tests.support.rpc import SERVICE

UNAUTHENTICATED = {"code": "unauthenticated", "message": "missing or invalid credentials"}


def call(
    daemon: TlsDaemon,
    pki: Pki,
    cert: tuple[Path, Path] | None,
    method: str = "ListVms",
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    with httpx.Client(verify=pki.context(cert)) as client:
        return client.post(f"{daemon.url}/{SERVICE}/{method}", json=body or {}, headers=headers or {})


def test_certificate_names_the_customer(mtls_daemon: TlsDaemon, pki: Pki) -> None:
    customer = "m" + uuid.uuid4().hex[:10]
    by_uri = pki.client(f"{customer}-uri", uris=(f"spiffe://metald/customer/{customer}",), cn="ignored")
    by_cn = pki.client(f"{customer}-cn", cn=customer)
    other = pki.client(f"{customer}-other", uris=(f"spiffe://metald/customer/x{customer}",))
    created = call(mtls_daemon, pki, by_uri, "CreateVm", {"config": {}})
    assert created.status_code == 200, created.text
    vm_id = created.json()["vm_id"]
    try:
        for cert in (by_uri, by_cn):
            listed = call(mtls_daemon, pki, cert)
            assert [v["vm_id"] for v in listed.json()["vms"]] == [vm_id]
        assert call(mtls_daemon, pki, other).json().get("vms", []) == []
        foreign = call(mtls_daemon, pki, other, "GetVmInfo", {"vm_id": vm_id})
        assert foreign.status_code == 403
    finally:
        call(mtls_daemon, pki, by_uri, "DeleteVm", {"vm_id": vm_id, "force": True})


def test_no_certificate_is_unauthenticated_whatever_the_headers(mtls_daemon: TlsDaemon, pki: Pki) -> None:
    for headers in ({}, {"Authorization": "Bearer dev_customer_alice"}):
        resp = call(mtls_daemon, pki, None, "CreateVm", {"config": {}}, headers)
        assert resp.status_code == 401
        assert {k: resp.json()[k] for k in UNAUTHENTICATED} == UNAUTHENTICATED
    assert httpx.get(f"{mtls_daemon.url}/health", verify=pki.context()).status_code == 200


@pytest.mark.parametrize(
    ("name", "cn", "uris"),
    [
        ("URI SAN of another form, CN present", "alice", ("spiffe://metald/workload/alice",)),
        ("two customers in URI SANs", None, ("spiffe://metald/customer/a", "spiffe://metald/customer/b")),
        ("customer id with a slash", None, ("spiffe://metald/customer/a/b",)),
        ("CN not a customer id", "alice smith", ()),
        ("no name at all", None, ("https://example.test/customer/alice",)),
    ],
)
def test_certificate_naming_no_single_customer_is_refused(
    mtls_daemon: TlsDaemon, pki: Pki, name: str, cn: str | None, uris: tuple[str, ...]
) -> None:
    cert = pki.client("odd-" + uuid.uuid4().hex[:6], cn=cn, uris=uris)
    resp = call(mtls_daemon, pki, cert)
    assert resp.status_code == 401, name


def test_certificate_from_another_ca_fails_the_handshake(mtls_daemon: TlsDaemon, pki: Pki) -> None:
    rogue = pki.client("rogue-alice", cn="alice", uris=("spiffe://metald/customer/alice",), rogue=True)
    with pytest.raises(httpx.HTTPError):
        call(mtls_daemon, pki, rogue)
    trusted = pki.client("alice", cn="alice")
    assert call(mtls_daemon, pki, trusted).status_code == 200, "the same name from the trusted CA works"


def test_grpcio_with_a_client_certificate(mtls_daemon: TlsDaemon, pki: Pki) -> None:
    customer = "g" + uuid.uuid4().hex[:10]
    cert, key = pki.client(customer, uris=(f"spiffe://metald/customer/{customer}",))

    def list_vms(credentials: grpc.ChannelCredentials) -> pb.ListVmsResponse:
        with grpc.secure_channel(f"127.0.0.1:{mtls_daemon.port}", credentials) as channel:
            response: pb.ListVmsResponse = channel.unary_unary(
                f"/{SERVICE}/ListVms",
                request_serializer=lambda m: m.to_binary(),
                response_deserializer=pb.ListVmsResponse.from_binary,
            )(pb.ListVmsRequest(), timeout=30)
            return response

    ca = pki.ca_path.read_bytes()
    with_cert = grpc.ssl_channel_credentials(ca, key.read_bytes(), cert.read_bytes())
    assert list_vms(with_cert).total_count == 0
    with pytest.raises(grpc.RpcError) as caught:
        list_vms(grpc.ssl_channel_credentials(ca))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_identity_belongs_to_its_connection(mtls_daemon: TlsDaemon, pki: Pki) -> None:
    """Kept-alive HTTP/2 and HTTP/1.1 connections with and without certificates, interleaved:
    each request is judged by its own connection's certificate only."""
    alice, bob = (pki.client(n, uris=(f"spiffe://metald/customer/{n}",)) for n in ("ic-alice", "ic-bob"))
    vm_id = call(mtls_daemon, pki, alice, "CreateVm", {"config": {}}).json()["vm_id"]
    clients = {
        name: httpx.Client(base_url=mtls_daemon.url, verify=pki.context(cert), http2=h2)
        for name, cert, h2 in (("alice", alice, True), ("bob", bob, False), ("anon", None, True))
    }
    try:
        for _ in range(3):
            for name, client in clients.items():
                resp = client.post(f"/{SERVICE}/GetVmInfo", json={"vm_id": vm_id})
                assert resp.status_code == {"alice": 200, "bob": 403, "anon": 401}[name], (name, resp.text)
    finally:
        for client in clients.values():
            client.close()
        call(mtls_daemon, pki, alice, "DeleteVm", {"vm_id": vm_id, "force": True})
