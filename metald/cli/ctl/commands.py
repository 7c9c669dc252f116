"""One function per metalctl command: call the SDK, print through Output, return the exit status."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from metald.cli.ctl import events, guest, vmspec
from metald.cli.ctl.render import Output
from metald.client import Client
from metald.client.common import state, state_name

Command = Callable[[Client, argparse.Namespace, Output], int]
CONSOLE_POLL_SECONDS = 0.5


def _boot(client: Client, out: Output, vm_id: str, args: argparse.Namespace) -> int:
    started = time.monotonic()
    wait = not args.no_wait
    with out.waiting(f"booting {vm_id}" + (" until the guest is up" if wait else "")):
        result = client.boot_vm(vm_id, wait_for_ready=wait, wait_timeout_seconds=args.timeout)
    out.done(vm_id, result.state, "booted" + (", guest up," if wait else ""), started)
    return 0


def create(client: Client, args: argparse.Namespace, out: Output) -> int:
    vm_id, config = vmspec.build(args)
    started = time.monotonic()
    created = client.create_vm(config, vm_id=vm_id, snapshot_id=args.from_snapshot)
    if args.boot:
        return _boot(client, out, created.vm_id, args)
    out.done(created.vm_id, created.state, "created", started)
    return 0


def boot(client: Client, args: argparse.Namespace, out: Output) -> int:
    return _boot(client, out, args.vm_id, args)


def pause(client: Client, args: argparse.Namespace, out: Output) -> int:
    started = time.monotonic()
    out.done(args.vm_id, client.pause_vm(args.vm_id).state, "paused", started)
    return 0


def resume(client: Client, args: argparse.Namespace, out: Output) -> int:
    started = time.monotonic()
    out.done(args.vm_id, client.resume_vm(args.vm_id).state, "resumed", started)
    return 0


def reboot(client: Client, args: argparse.Namespace, out: Output) -> int:
    started = time.monotonic()
    with out.waiting(f"rebooting {args.vm_id}"):
        result = client.reboot_vm(args.vm_id, force=args.force)
    out.done(args.vm_id, result.state, "rebooted", started)
    return 0


def shutdown(client: Client, args: argparse.Namespace, out: Output) -> int:
    started = time.monotonic()
    how = "forced off" if args.force else "shut down"
    with out.waiting(f"shutting down {args.vm_id}" + ("" if args.force else " gracefully")):
        result = client.shutdown_vm(args.vm_id, force=args.force, timeout_seconds=args.timeout)
    out.done(args.vm_id, result.state, how, started)
    return 0


def delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    started = time.monotonic()
    with out.waiting(f"deleting {args.vm_id}"):
        client.delete_vm(args.vm_id, force=args.force)
    if out.json:
        out.emit({"vm_id": args.vm_id, "success": True})
    else:
        out.out.print(f"[bold]{args.vm_id}[/]  deleted in {time.monotonic() - started:.1f}s")
    return 0


def get(client: Client, args: argparse.Namespace, out: Output) -> int:
    out.vm_details(client.get_vm_info(args.vm_id))
    return 0


def list_(client: Client, args: argparse.Namespace, out: Output) -> int:
    out.vm_list(client.iter_vms(states=args.state, page_size=args.page_size))
    return 0


def wait(client: Client, args: argparse.Namespace, out: Output) -> int:
    wanted = state(args.state)
    with out.waiting(f"waiting for {args.vm_id} to be {wanted.name}"):
        info = client.wait_for_state(args.vm_id, wanted, timeout=args.timeout)
    if out.json:
        out.emit({"vm_id": args.vm_id, "state": state_name(info.state)})
    else:
        out.out.print(f"[bold]{args.vm_id}[/]  {info.state.name}")
    return 0


def console(client: Client, args: argparse.Namespace, out: Output) -> int:
    """The console log from the start (or the last --tail bytes); -f keeps following it."""
    offset = max(client.console(args.vm_id, 0, 1).size - args.tail, 0) if args.tail else 0
    while True:
        chunk = client.console(args.vm_id, offset)
        if chunk.data:
            sys.stdout.buffer.write(chunk.data)
            sys.stdout.buffer.flush()
        offset = chunk.offset
        if chunk.data and offset < chunk.size:
            continue  # more is there already
        if not args.follow:
            return 0
        time.sleep(CONSOLE_POLL_SECONDS)


def health(client: Client, args: argparse.Namespace, out: Output) -> int:
    body = client.health()
    out.health(body)
    return 14 if body.get("status") == "unhealthy" else 0  # 14: UNAVAILABLE


COMMANDS: dict[str, Command] = {
    "create": create,
    "boot": boot,
    "pause": pause,
    "resume": resume,
    "reboot": reboot,
    "shutdown": shutdown,
    "delete": delete,
    "get": get,
    "list": list_,
    "wait": wait,
    "console": console,
    "health": health,
    "exec": guest.exec_,
    "cp": guest.cp,
    "watch": events.watch,
    "snapshot": events.snapshot,
}
