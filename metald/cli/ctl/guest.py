"""`metalctl exec` and `metalctl cp`: work inside a running guest through ExecVm / WriteFile / ReadFile."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from metald.cli.ctl.render import Output
from metald.cli.ctl.vmspec import metadata_pair
from metald.client import Client


def _exec_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--env", "-e", action="append", default=[], type=metadata_pair, metavar="KEY=VALUE")
    p.add_argument("--workdir", "-w", default="", help="absolute guest directory to run in")
    p.add_argument("--timeout", type=int, default=0, help="seconds; killed in the guest past it")
    p.add_argument("--stdin", "-i", action="store_true", help="send metalctl's stdin to the command")
    return p


# The flags typed between VM and `--` (argparse hands them over with the command).
_AFTER_VM = _exec_flags(argparse.ArgumentParser(prog="metalctl exec VM", add_help=False))


def add_flags(exec_parser: argparse.ArgumentParser, cp_parser: argparse.ArgumentParser) -> None:
    _exec_flags(exec_parser).add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    cp_parser.add_argument("source", help="LOCAL or VM:/PATH ('-': stdin)")
    cp_parser.add_argument("dest", help="VM:/PATH or LOCAL ('-': stdout)")


def exec_(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Exit status: the command's own (0-255), so scripts read it as if it ran here."""
    argv = list(args.argv)
    if "--" in argv:
        cut = argv.index("--")
        later = _AFTER_VM.parse_args(argv[:cut])
        argv = argv[cut + 1 :]
        args.env += later.env
        args.workdir = later.workdir or args.workdir
        args.timeout = later.timeout or args.timeout
        args.stdin = later.stdin or args.stdin
    if not argv:
        return out.failure("invalid_argument", "usage: metalctl exec VM -- CMD [ARG...]", 2)
    result = client.exec_vm(
        args.vm_id,
        argv,
        env=dict(args.env),
        stdin=sys.stdin.buffer.read() if args.stdin else b"",
        working_dir=args.workdir,
        timeout_seconds=args.timeout,
    )
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    if result.timed_out:
        print(
            f"metalctl: timed out after {args.timeout or 'the default'} s; killed in the guest",
            file=sys.stderr,
        )
    if result.truncated:
        print("metalctl: output cut at 16 MiB per stream", file=sys.stderr)
    sys.stderr.flush()
    return result.exit_code & 0xFF


def _remote(spec: str) -> tuple[str, str] | None:
    """VM:/PATH -> (VM, /PATH); a local path (nothing before ':', or no ':/') -> None."""
    vm_id, sep, path = spec.partition(":")
    return (vm_id, path) if sep and vm_id and path.startswith("/") else None


def cp(client: Client, args: argparse.Namespace, out: Output) -> int:
    source, dest = _remote(args.source), _remote(args.dest)
    if (source is None) == (dest is None):
        return out.failure("invalid_argument", "metalctl cp: exactly one side is VM:/PATH", 2)
    if dest is not None:
        if args.source == "-":
            content, mode = sys.stdin.buffer.read(), 0
        else:
            local = Path(args.source)
            content, mode = local.read_bytes(), local.stat().st_mode & 0o7777
        client.write_file(dest[0], dest[1], content, mode=mode)
        return 0
    assert source is not None
    file = client.read_file(source[0], source[1])
    if args.dest == "-":
        sys.stdout.buffer.write(file.content)
        sys.stdout.flush()
    else:
        target = Path(args.dest)
        target = target / Path(source[1]).name if target.is_dir() else target
        target.write_bytes(file.content)
        os.chmod(target, file.mode or 0o644)
    return 0
