"""`metald`: serve the API, or build the default guest image.

Every setting is a flag of `metald serve`, generated from the Settings model so that --help and
the defaults shown are the ones in force (flags > METALD_* env > config file > defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from metald import __version__
from metald.settings import Settings, load_settings


def _flag_type(annotation: object) -> object:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and args:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return str
    return annotation if annotation in (int, float, Path) else str


# The settings a fleet gateway uses (it runs no VMs: no backend, store or network settings).
GATEWAY_SETTINGS = (
    "listen", "log_format", "log_level", "auth_mode", "insecure_dev_auth", "jwt_secret", "jwt_jwks_file",
    "jwt_audience", "jwt_issuer", "jwt_customer_claim", "jwt_leeway_seconds", "tls_cert", "tls_key",
    "tls_client_ca", "server", "default_vcpus", "default_memory_mib", "max_vms_per_customer",
    "max_vcpus_per_customer", "max_memory_mib_per_customer", "max_snapshots_per_customer",
    "max_snapshot_mib_per_customer", "max_request_bytes", "max_metadata_entries",
    "max_kernel_args_length", "fleet_dsn", "fleet_secret_file", "fleet_operator_token_file", "config_file",
)  # fmt: skip


def _add_settings_flags(parser: argparse.ArgumentParser, only: Sequence[str] = ()) -> None:
    for name, field in Settings.model_fields.items():
        if only and name not in only:
            continue
        flag = "--" + name.replace("_", "-")
        env = "METALD_" + name.upper()
        default = field.default
        help_text = f"{field.description or ''} [env {env}; default: {default}]"
        if field.annotation is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        choices = (
            typing.get_args(field.annotation)
            if typing.get_origin(field.annotation) is typing.Literal
            else None
        )
        parser.add_argument(
            flag,
            dest=name,
            type=_flag_type(field.annotation),  # type: ignore[arg-type]
            choices=choices,
            default=None,
            metavar=name.upper(),
            help=help_text,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metald", description="metald: VM provisioning daemon")
    parser.add_argument("--version", action="version", version=f"metald {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the VmService API (Connect, gRPC, gRPC-Web, REST)")
    _add_settings_flags(serve)
    gateway = sub.add_parser(
        "gateway", help="serve the VmService of a whole fleet (docs/fleet.md): place and forward to hosts"
    )
    _add_settings_flags(gateway, GATEWAY_SETTINGS)
    image = sub.add_parser("image", help="guest images")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    build = image_sub.add_parser("build", help="build the default guest from Debian packages")
    build.add_argument(
        "--assets-dir", type=Path, default=None, help="output dir (default: settings' assets dir)"
    )
    build.add_argument("--cache-dir", type=Path, default=None, help="where .deb files are kept")
    build.add_argument("--force", action="store_true", help="rebuild even if up to date")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "gateway"):
        overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
        try:
            settings = load_settings(**overrides)
        except ValidationError as exc:
            print(f"metald: invalid settings:\n{exc}", file=sys.stderr)
            return 2
        from metald.api.auth import ConfigError
        from metald.daemon import run
        from metald.fleet.serve import run_gateway
        from metald.store.sqlite_schema import SchemaTooNewError

        # One pidfd per VMM supervisor instead of one waiting thread each (Python 3.11's default).
        asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
        try:
            asyncio.run(run(settings) if args.command == "serve" else run_gateway(settings))
        except (ConfigError, SchemaTooNewError) as exc:
            print(f"metald: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            pass
        return 0
    settings = load_settings()
    from metald.guest.builder import build_cli

    assets = args.assets_dir or settings.assets_root
    cache = args.cache_dir or settings.data_dir / "cache"
    return build_cli(str(assets), str(cache), args.force)


if __name__ == "__main__":
    sys.exit(main())
