"""`metalctl watch` and `metalctl snapshot ...`: the WatchVms stream as rows, and snapshots."""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar, cast

from metald.cli.ctl.render import Output
from metald.cli.ctl.vmspec import metadata_pair
from metald.client import Client

T = TypeVar("T")
Command = Callable[[Client, argparse.Namespace, Output], int]
Parser = Callable[..., argparse.ArgumentParser]


def add_parsers(command: Parser, flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """`command(name, help, vm=...)` makes a subcommand parser with the connection flags;
    `flags` adds them to the parsers of snapshot's verbs."""
    watch_parser = command("watch", "print VM events as they happen, until interrupted", vm=False)
    watch_parser.add_argument("--state", action="append", default=[], help="new state (repeatable)")
    watch_parser.add_argument("--vm", action="append", default=[], metavar="ID", help="VM id (repeatable)")
    watch_parser.add_argument(
        "--after", default="", metavar="CURSOR", help="replay the kept events after CURSOR first ('0': all)"
    )
    watch_parser.add_argument(
        "--reconnect", action="store_true", help="on a disconnect, resume after the last event seen"
    )
    snapshot_parser = command("snapshot", "snapshots of VMs, and clones from them", vm=False)
    verbs = snapshot_parser.add_subparsers(dest="snapshot_command", required=True, metavar="VERB")

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help_text, description=help_text)
        flags(p)
        return p

    create = verb("create", "snapshot a running or paused VM")
    create.add_argument("vm_id", metavar="VM")
    create.add_argument("--id", default="", metavar="SNAP", help="the snapshot's id (default: snap_...)")
    create.add_argument(
        "--metadata", "-m", action="append", default=[], type=metadata_pair, metavar="KEY=VALUE"
    )
    create.add_argument("--warm-pool", type=int, default=0, metavar="N", help="VMMs kept ready for clones")
    listing = verb("list", "list your snapshots")
    listing.add_argument("--page-size", type=int, default=100)
    verb("delete", "delete a snapshot (its files stay until its last clone goes)").add_argument(
        "snapshot_id", metavar="SNAP"
    )


def _on_a_thread(items: Iterator[T]) -> Iterator[T]:
    """`items`, read on a daemon thread: a stream blocked in the HTTP client's native code would
    not see Ctrl-C, while the main thread waiting on the queue does."""
    box: queue.Queue[tuple[T | None, BaseException | None, bool]] = queue.Queue(maxsize=1024)

    def pump() -> None:
        try:
            for item in items:
                box.put((item, None, False))
        except BaseException as exc:
            box.put((None, exc, True))
        else:
            box.put((None, None, True))

    threading.Thread(target=pump, name="metalctl-watch", daemon=True).start()
    while True:
        item, error, done = box.get()
        if error is not None:
            raise error
        if done:
            return
        yield cast(T, item)


def watch(client: Client, args: argparse.Namespace, out: Output) -> int:
    """One row (or JSON line) per event; runs until interrupted (exit 130) or the stream ends."""
    events = client.watch_vms(
        states=args.state,
        vm_ids=args.vm,
        after_cursor=args.after,
        reconnect=args.reconnect,
        on_reconnect=out.reconnecting,
    )
    out.event_header()
    try:
        for event in _on_a_thread(events):
            out.event(event)
    except KeyboardInterrupt:
        # The stream's thread holds an HTTP connection that closing the client would wait for:
        # Ctrl-C ends the command at once instead.
        sys.stdout.flush()
        os._exit(130)
    return 0


def _snapshot_create(client: Client, args: argparse.Namespace, out: Output) -> int:
    started = time.monotonic()
    with out.waiting(f"snapshotting {args.vm_id}"):
        taken = client.snapshot_vm(
            args.vm_id, snapshot_id=args.id, metadata=dict(args.metadata), warm_pool_size=args.warm_pool
        )
    out.snapshot_taken(args.vm_id, taken, started)
    return 0


def _snapshot_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    out.snapshot_list(client.iter_snapshots(page_size=args.page_size))
    return 0


def _snapshot_delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    client.delete_snapshot(args.snapshot_id)
    if out.json:
        out.emit({"snapshot_id": args.snapshot_id, "success": True})
    else:
        out.out.print(f"[bold]{args.snapshot_id}[/]  deleted")
    return 0


_SNAPSHOT_VERBS: dict[str, Command] = {
    "create": _snapshot_create,
    "list": _snapshot_list,
    "delete": _snapshot_delete,
}


def snapshot(client: Client, args: argparse.Namespace, out: Output) -> int:
    return _SNAPSHOT_VERBS[args.snapshot_command](client, args, out)
