"""One typed settings object: defaults < config file (TOML) < METALD_* environment < CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

MIB = 1024 * 1024


def cap(default: int, what: str = "") -> Any:
    """A limit that 0 switches off (quotas, capacity); `what` it counts, for the description."""
    return Field(default, ge=0, description=f"{what}; 0 = unlimited" if what else "0 = unlimited")


class DataPaths(NamedTuple):
    """What the daemon keeps under data_dir; all of it private (never served as an asset)."""

    vms: Path  # one directory per VM
    snapshots: Path
    pool: Path  # warm pool slots: beside vms, as a slot's directory is renamed into it
    db: Path  # the SQLite store


class Settings(BaseSettings):
    """Every knob of the daemon. Environment variables are METALD_<FIELD> (upper case)."""

    model_config = SettingsConfigDict(env_prefix="METALD_", extra="forbid")

    # --- serving ---
    listen: str = Field("127.0.0.1:8080", description="HOST:PORT the API listens on (all protocols)")
    server: Literal["hypercorn", "pyvoy"] = Field(
        "hypercorn",
        description="HTTP server: hypercorn, or pyvoy (Envoy; cleartext only, `pip install pyvoy`)",
    )
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
    ram_dir: Path | None = Field(
        Path("/dev/shm/metald"),
        description="tmpfs dir for guest RAM files (QEMU; makes VMs snapshottable); empty: anonymous RAM",
    )

    # --- lifecycle defaults ---
    default_vcpus: int = Field(1, ge=1, le=32, description="vCPUs when the config omits cpu")
    default_memory_mib: int = Field(256, ge=128, description="memory when the config omits memory")
    shutdown_timeout_seconds: float = Field(30.0, gt=0, description="graceful shutdown wait for timeout 0")
    boot_wait_timeout_seconds: float = Field(60.0, gt=0, description="BootVm wait_for_ready default")
    stop_vms_on_exit: bool = Field(
        False, description="stop every VM when the daemon exits (default: they run on, re-adopted at start)"
    )
    console_log_max_bytes: int = Field(
        4 * 1024 * 1024, ge=64 * 1024, description="per-VM console log bound; older output is dropped"
    )

    # --- networking ---
    network_enabled: bool = Field(True, description="attach NICs (needs root: netns, TAPs, tc)")
    network_host_netns: str = Field(
        "metald-host", description="namespace holding customer bridges; empty = the root namespace"
    )
    network_ipv4_pool: str = Field("10.240.0.0/16", description="carved into one /24 per customer")
    network_ipv6_pool: str = Field("fd6d:6574:616c::/48", description="carved into one /64 per customer")
    network_allow_egress: bool = Field(
        False, description="open interfaces' egress policies (route + NAT) toward network_egress_uplink"
    )
    network_egress_uplink: str = Field(
        "", description="interface in the host namespace that egress leaves by (the operator's)"
    )
    network_walls_check_seconds: float = Field(
        10.0, gt=0, description="how often the nftables walls are checked and restored if missing"
    )

    # --- state store ---
    store: Literal["sqlite", "memory"] = Field(
        "sqlite", description="state store: sqlite (data_dir/metald.db); memory keeps nothing across restarts"
    )
    event_retention_count: int = Field(100_000, ge=1, description="VM events kept for watchers (newest)")
    event_retention_seconds: float = Field(0.0, ge=0, description="drop VM events older; 0 = by count only")

    # --- quotas and capacity ---
    max_vms_per_customer: int = cap(1000)
    max_snapshots_per_customer: int = cap(100, "snapshots kept per customer")
    max_snapshot_mib_per_customer: int = cap(65536, "bytes of snapshot files per customer, MiB")
    max_warm_pool_size: int = Field(8, ge=0, le=64, description="largest warm_pool_size a snapshot may ask")
    max_vcpus_per_customer: int = cap(64)
    max_memory_mib_per_customer: int = cap(65536)
    max_vms: int = cap(20000, "host-wide VM cap")
    vcpu_overcommit_ratio: float = Field(8.0, gt=0, description="host vCPUs <= cores * ratio")
    memory_overcommit_ratio: float = Field(1.5, gt=0, description="host guest memory <= RAM * ratio")
    max_request_bytes: int = Field(1 * MIB, ge=1024, description="largest accepted request body")
    max_metadata_entries: int = Field(64, ge=0, description="metadata entries per VM")
    max_kernel_args_length: int = Field(2048, ge=64, description="longest accepted kernel_args")
    exec_default_timeout_seconds: float = Field(
        60.0, gt=0, description="ExecVm timeout for timeout_seconds 0"
    )
    exec_max_timeout_seconds: float = Field(
        3600.0, gt=0, description="longest accepted ExecVm timeout_seconds"
    )

    # --- fleet (docs/fleet.md) ---
    fleet_dsn: str = Field("", description="PostgreSQL DSN of the fleet inventory; empty: a lone host")
    fleet_host_id: str = Field("", description="this host's name in the fleet (fleet mode)")
    fleet_advertise_url: str = Field("", description="http://ADDR:PORT gateways reach this host at")
    fleet_secret_file: Path | None = Field(
        None, description="file with the shared fleet secret (>= 32 bytes)"
    )
    fleet_allow_direct_calls: bool = Field(
        False, description="in fleet mode, also accept customer credentials sent straight to this host"
    )
    fleet_heartbeat_seconds: float = Field(5.0, gt=0, description="how often a host renews its lease")
    fleet_lease_seconds: float = Field(15.0, gt=0, description="a host without a heartbeat this long is down")
    fleet_operator_token_file: Path | None = Field(
        None, description="gateway: file with the operator token for GET /v1/fleet/hosts (metalctl hosts)"
    )

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
    def paths(self) -> DataPaths:
        d = self.data_dir
        return DataPaths(vms=d / "vms", snapshots=d / "snapshots", pool=d / "pool", db=d / "metald.db")

    @property
    def db_path(self) -> Path:
        return self.paths.db

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
