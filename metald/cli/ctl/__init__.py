"""`metalctl`: the command-line client of a metald daemon (see docs/client.md).

Exit status: 0 on success; the gRPC code number of an API error (3 invalid_argument, 5 not_found,
7 permission_denied, 9 failed_precondition, 14 unavailable, 16 unauthenticated, ...); 4 when a
wait times out; 2 for usage errors; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from metald import __version__
from metald.cli.ctl import events, guest, hosts
from metald.cli.ctl.commands import COMMANDS
from metald.cli.ctl.render import Output
from metald.cli.ctl.vmspec import metadata_pair, parse_size
from metald.client import ApiError, Client
from metald.client.common import DEFAULT_URL, PROTOCOLS


def _connection_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """On the main parser with defaults; on each command with none, so they may go either side."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--url",
        default=default(os.environ.get("METALD_URL", DEFAULT_URL)),
        help=f"daemon URL [env METALD_URL; default {DEFAULT_URL}]",
    )
    parser.add_argument(
        "--token", default=default(os.environ.get("METALD_TOKEN", "")), help="bearer token [env METALD_TOKEN]"
    )
    parser.add_argument("-o", "--output", choices=("table", "json"), default=default("table"))
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default=default("connect"))
    parser.add_argument("--tls-ca", type=Path, default=default(None), help="CA bundle for https URLs")
    parser.add_argument("--tls-cert", type=Path, default=default(None), help="client certificate (mTLS)")
    parser.add_argument("--tls-key", type=Path, default=default(None), help="client key (mTLS)")


def _create_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("vm_id", nargs="?", default="", help="the VM's id (default: chosen by the daemon)")
    p.add_argument(
        "--from-snapshot",
        default="",
        metavar="SNAP",
        help="a clone of SNAP (its CPU, memory, boot and disks)",
    )
    p.add_argument("-f", "--file", type=Path, help="CreateVm request or VmConfig, JSON or YAML ('-': stdin)")
    p.add_argument("--vcpus", type=int)
    p.add_argument("--memory", type=parse_size, help="e.g. 512MiB, 1GiB")
    p.add_argument("--cpu-template")
    p.add_argument("--kernel", help="e.g. /assets/vmlinux")
    p.add_argument("--kernel-args")
    p.add_argument("--initrd")
    p.add_argument("--rootfs", help="root disk image, e.g. /assets/rootfs.ext4")
    p.add_argument("--disk", action="append", default=[], metavar="PATH[:ro]", help="extra disk (repeatable)")
    p.add_argument("--net", action="store_true", help="one TAP NIC, eth0, MAC and addresses chosen by metald")
    p.add_argument("--console-type", choices=("SERIAL", "VIRTIO_CONSOLE"))
    p.add_argument("--metadata", "-m", action="append", default=[], type=metadata_pair, metavar="KEY=VALUE")
    p.add_argument("--boot", action="store_true", help="boot it right away")


def _boot_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-wait", action="store_true", help="return once the VMM runs, not the guest")
    p.add_argument("--timeout", type=int, default=0, help="seconds to wait for the guest (default: daemon's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metalctl", description="Drive a metald daemon.")
    parser.add_argument("--version", action="version", version=f"metalctl {__version__}")
    _connection_flags(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, vm: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _connection_flags(p, defaults=False)
        if vm:
            p.add_argument("vm_id", metavar="VM")
        return p

    create = command("create", "create a VM (and boot it with --boot)", vm=False)
    _create_flags(create)
    _boot_flags(create)
    _boot_flags(command("boot", "boot a VM, by default until its guest is up"))
    command("pause", "pause a running VM")
    command("resume", "resume a paused VM")
    command("reboot", "reboot a running VM").add_argument("--force", action="store_true")
    shutdown = command("shutdown", "shut a VM down, gracefully unless --force")
    shutdown.add_argument("--force", action="store_true")
    shutdown.add_argument("--timeout", type=int, default=0, help="graceful wait, seconds (default: daemon's)")
    command("delete", "delete a VM (--force: even if running)").add_argument("--force", action="store_true")
    command("get", "show a VM")
    listing = command("list", "list your VMs", vm=False)
    listing.add_argument(
        "--state", action="append", default=[], help="filter (repeatable): running, paused, ..."
    )
    listing.add_argument("--page-size", type=int, default=100)
    wait = command("wait", "wait until a VM is in a state")
    wait.add_argument("--state", required=True, help="created, running, paused or shutdown")
    wait.add_argument("--timeout", type=float, default=120.0, help="seconds (exit 4 when over)")
    console = command("console", "print a VM's console output")
    console.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    console.add_argument(
        "--tail", type=int, default=0, metavar="BYTES", help="start this many bytes from the end"
    )
    command("health", "the daemon's health (exit 14 when unhealthy)", vm=False)
    guest.add_flags(
        command("exec", "run a command in a running guest; exits with the command's status"),
        command("cp", "copy a file into (LOCAL VM:/PATH) or out of (VM:/PATH LOCAL) a guest", vm=False),
    )
    events.add_parsers(command, lambda p: _connection_flags(p, defaults=False))
    command("hosts", hosts.HELP, vm=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Output(json_mode=args.output == "json")
    if args.command == "hosts":  # the gateway's operator endpoint, not the VmService
        return hosts.run(args, out)
    try:
        with Client(
            args.url,
            args.token,
            protocol=args.protocol,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        ) as client:
            return COMMANDS[args.command](client, args, out)
    except ApiError as exc:
        return out.error(exc)
    except TimeoutError as exc:
        return out.failure("deadline_exceeded", str(exc), 4)
    except (ValueError, OSError) as exc:  # a bad state name, a file that does not parse or exist
        return out.failure("invalid_argument", str(exc), 3)
    except KeyboardInterrupt:
        return 130
