"""One typed settings object: defaults < config file (TOML) < METALD_* environment < CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

MIB = 1024 * 1024


class Settings(BaseSettings):
    """Every knob of the daemon. Environment variables are METALD_<FIELD> (upper case)."""

    model_config = SettingsConfigDict(env_prefix="METALD_", extra="forbid")

    # --- serving ---
    listen: str = Field("127.0.0.1:8080", description="HOST:PORT the API listens on (all protocols)")
    data_dir: Path = Field(Path("/var/lib/metald"), description="state: SQLite file, one dir per VM")
    assets_dir: Path | None = Field(
        None, description="host dir behind the virtual /assets/ root (default DATA_DIR/assets)"
    )
    log_format: Literal["auto", "json", "text"] = Field("auto", description="auto: text on a TTY")
    log_level: str = Field("INFO", description="Python logging level")

    # --- auth / TLS ---
    auth_mode: Literal["dev", "jwt", "mtls"] = Field("dev", description="how callers prove who they are")
    insecure_dev_auth: bool = Field(False, description="allow dev tokens on a non-loopback bind")
    jwt_secret: str = Field("", description="HS256 shared secret (jwt mode)")
    jwt_jwks_file: Path | None = Field(None, description="JWKS file with RS256/ES256 keys (jwt mode)")
    jwt_audience: str = Field("", description="required aud claim (empty: not checked)")
    jwt_issuer: str = Field("", description="required iss claim (empty: not checked)")
    jwt_customer_claim: str = Field("sub", description="claim that names the customer")
    jwt_leeway_seconds: int = Field(30, ge=0, le=300, description="allowed clock skew")
    tls_cert: Path | None = Field(None, description="server certificate (PEM); enables TLS")
    tls_key: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca: Path | None = Field(None, description="CA for client certificates (mtls mode)")

    # --- backend ---
    backend: Literal["auto", "qemu", "firecracker"] = Field("auto", description="VMM backend")
    qemu_binary: str = Field("qemu-system-x86_64", description="QEMU system emulator")
    qemu_img_binary: str = Field("qemu-img", description="qemu-img, for per-VM overlays")
    accel: Literal["auto", "kvm", "tcg"] = Field("auto", description="auto: probe KVM once, else TCG")
    firecracker_binary: str = Field("firecracker", description="Firecracker binary")
    jailer_binary: str = Field("", description="jailer binary; empty runs Firecracker unjailed")
    jailer_chroot_base: Path = Field(Path("/srv/jailer"), description="jailer --chroot-base-dir")
    vmm_user: str = Field(
        "metald-vmm", description='user VMMs run as ("": the daemon\'s own; missing: a warning, the same)'
    )
    vmm_uid: int | None = Field(None, description="uid VMMs run as, instead of vmm_user's")
    vmm_gid: int | None = Field(None, description="gid VMMs run as (default: the user's group)")
    cgroup_root: Path = Field(Path("/sys/fs/cgroup"), description="cgroup mount root")

    # --- lifecycle defaults ---
    default_vcpus: int = Field(1, ge=1, le=32, description="vCPUs when the config omits cpu")
    default_memory_mib: int = Field(256, ge=128, description="memory when the config omits memory")
    shutdown_timeout_seconds: float = Field(30.0, gt=0, description="graceful shutdown wait for timeout 0")
    boot_wait_timeout_seconds: float = Field(60.0, gt=0, description="BootVm wait_for_ready default")

    # --- networking ---
    network_enabled: bool = Field(True, description="attach NICs (needs root: netns, TAPs, tc)")
    network_host_netns: str = Field(
        "metald-host", description="namespace holding customer bridges; empty = the root namespace"
    )
    network_ipv4_pool: str = Field("10.240.0.0/16", description="carved into one /24 per customer")
    network_ipv6_pool: str = Field("fd6d:6574:616c::/48", description="carved into one /64 per customer")
    network_allow_egress: bool = Field(False, description="route/NAT guests to the outside (never in tests)")

    # --- quotas and capacity ---
    max_vms_per_customer: int = Field(1000, ge=0, description="0 = unlimited")
    max_vcpus_per_customer: int = Field(64, ge=0, description="0 = unlimited")
    max_memory_mib_per_customer: int = Field(65536, ge=0, description="0 = unlimited")
    max_vms: int = Field(20000, ge=0, description="host-wide VM cap; 0 = unlimited")
    vcpu_overcommit_ratio: float = Field(8.0, gt=0, description="host vCPUs <= cores * ratio")
    memory_overcommit_ratio: float = Field(1.5, gt=0, description="host guest memory <= RAM * ratio")
    max_request_bytes: int = Field(1 * MIB, ge=1024, description="largest accepted request body")
    max_metadata_entries: int = Field(64, ge=0, description="metadata entries per VM")
    max_kernel_args_length: int = Field(2048, ge=64, description="longest accepted kernel_args")
    max_connections: int = Field(
        0, ge=0, description="client connections served at once (more get 503); 0: half the fd limit"
    )

    # --- API edge ---
    cors_allowed_origins: str = Field(
        "", description="comma-separated browser origins allowed by CORS ('*': any); empty: CORS off"
    )
    metrics_token: str = Field(
        "", description="bearer token that unlocks per-customer series on /metrics; empty: never served"
    )

    config_file: Path | None = Field(None, description="TOML file with these settings")

    @property
    def assets_root(self) -> Path:
        return self.assets_dir or self.data_dir / "assets"

    @property
    def vms_dir(self) -> Path:
        return self.data_dir / "vms"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "metald.db"

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("METALD_CONFIG_FILE")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)


def load_settings(**overrides: Any) -> Settings:
    """Settings from file/env with CLI overrides (None values mean "not given")."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if "config_file" in given:
        os.environ["METALD_CONFIG_FILE"] = str(given["config_file"])
    return Settings(**given)
