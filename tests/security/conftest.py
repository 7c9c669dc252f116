"""Fixtures for the security walls: throwaway PKI and JWT keys, daemons in each auth mode, and a
private copy of the assets directory that attacks may litter."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import serving
from tests.security.pki import JwtKeys, Pki
from tests.support.daemon import Daemon


class TlsDaemon(Daemon):
    """A Daemon serving TLS: its readiness probe trusts the test CA (httpx honours SSL_CERT_FILE)."""

    def __init__(self, data_dir: Path, assets_dir: Path, *extra_args: str, ca: Path, name: str) -> None:
        super().__init__(data_dir, assets_dir, *extra_args, name=name)
        self.url = f"https://127.0.0.1:{self.port}"
        self.ca = ca

    def start(self, timeout: float = 30) -> TlsDaemon:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SSL_CERT_FILE", str(self.ca))
            super().start(timeout)
        return self


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def jwt_keys(tmp_path_factory: pytest.TempPathFactory) -> JwtKeys:
    return JwtKeys(tmp_path_factory.mktemp("jwt"))


def _tls_flags(pki: Pki) -> list[str]:
    return ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]


@pytest.fixture(scope="session")
def jwt_daemon(
    tmp_path_factory: pytest.TempPathFactory, assets_dir: Path, pki: Pki, jwt_keys: JwtKeys
) -> Iterator[TlsDaemon]:
    """jwt mode over TLS: HS256 secret and an RS256/ES256 JWKS, audience and issuer required."""
    with serving(
        TlsDaemon(
            tmp_path_factory.mktemp("jwtd"),
            assets_dir,
            "--auth-mode=jwt",
            f"--jwt-secret={jwt_keys.secret}",
            f"--jwt-jwks-file={jwt_keys.jwks_path}",
            "--jwt-audience=metald",
            "--jwt-issuer=https://issuer.test",
            "--jwt-customer-claim=tenant",
            "--jwt-leeway-seconds=5",
            "--no-network-enabled",
            *_tls_flags(pki),
            ca=pki.ca_path,
            name="sec-jwt",
        )
    ) as d:
        yield d


@pytest.fixture(scope="session")
def mtls_daemon(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path, pki: Pki) -> Iterator[TlsDaemon]:
    with serving(
        TlsDaemon(
            tmp_path_factory.mktemp("mtlsd"),
            assets_dir,
            "--auth-mode=mtls",
            f"--tls-client-ca={pki.ca_path}",
            "--no-network-enabled",
            *_tls_flags(pki),
            ca=pki.ca_path,
            name="sec-mtls",
        )
    ) as d:
        yield d


@pytest.fixture(scope="session")
def own_assets(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Path:
    """The guest image in a directory of our own, which attacks may litter with symlinks, FIFOs
    and device nodes. The disk images are copies, so that their checksums are ours to watch even
    if the shared image is rebuilt meanwhile."""
    own = tmp_path_factory.mktemp("own-assets")
    for name in ("rootfs.ext4", "data.ext4", "vmlinux", "initrd"):
        try:
            if name.endswith(".ext4"):
                raise OSError("copied, not linked")
            os.link((assets_dir / name).resolve(), own / name)
        except OSError:
            shutil.copyfile((assets_dir / name).resolve(), own / name)
    return own


@pytest.fixture(scope="session")
def own_daemon(tmp_path_factory: pytest.TempPathFactory, own_assets: Path) -> Iterator[Daemon]:
    with serving(
        Daemon(tmp_path_factory.mktemp("ownd"), own_assets, "--no-network-enabled", name="sec-own")
    ) as d:
        yield d
