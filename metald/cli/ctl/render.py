"""What metalctl prints: aligned tables (colours on a TTY), a spinner with elapsed time while it
waits, or JSON (`-o json`) in the API's own shape (snake_case, proto field names)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from protobuf import Message
from protobuf.wkt import Timestamp
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from metald.api.codec import SnakeCaseJsonCodec
from metald.client.common import state_name
from metald.client.errors import ApiError
from metald.gen.vmprovisioner.v1 import vm_pb as pb

STATE_STYLES = {"CREATED": "cyan", "RUNNING": "green", "PAUSED": "yellow", "SHUTDOWN": "red"}
HEALTH_STYLES = {"healthy": "green", "degraded": "yellow", "unhealthy": "red"}
_CODEC = SnakeCaseJsonCodec()
M = TypeVar("M", bound=Message)


def as_json(message: Message) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_CODEC.encode(message))
    return data


def header_table(columns: Sequence[str], *, no_wrap: bool = True) -> Table:
    """An empty table with bold headers and no borders, as every listing of metalctl has."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=no_wrap)
    return table


def _size(config: pb.VmConfig | None) -> list[str]:
    """The VCPUS and MEMORY cells of a VM's (or a snapshot's source's) config."""
    config = config or pb.VmConfig()
    vcpus = str(config.cpu.vcpu_count) if config.cpu else ""
    return [vcpus, human_bytes(config.memory.size_bytes) if config.memory else ""]


def _vm_row(vm: pb.VmInfo) -> list[str | Text]:
    name = vm.config.metadata.get("name", "") if vm.config else ""
    return [vm.vm_id, _state(vm.state), *_size(vm.config), _created(vm), name]


def _snapshot_row(snap: pb.Snapshot) -> list[str | Text]:
    sizes = [human_bytes(snap.size_bytes), str(snap.warm_pool_size)]
    return [snap.snapshot_id, snap.source_vm_id, *_size(snap.config), *sizes, _created(snap)]


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{value:.4g} {unit}"


def _state(value: pb.VmState | int) -> Text:
    name = state_name(value).removeprefix("VM_STATE_")
    return Text(name, style=STATE_STYLES.get(name, ""))


def _created(info: pb.VmInfo | pb.GetVmInfoResponse | pb.Snapshot) -> str:
    return _time(info.created_at)


def _time(at: Timestamp | None, fraction: bool = False) -> str:
    if at is None:
        return ""
    ts = datetime.fromtimestamp(at.seconds + at.nanos / 1e9, UTC)
    return ts.strftime("%Y-%m-%d %H:%M:%S" + (".%f" if fraction else ""))[: 23 if fraction else 19] + "Z"


# `metalctl watch` prints rows as events come, so its columns have fixed widths (the last is free).
EVENT_COLUMNS = (("CURSOR", 8), ("AT", 24), ("VM ID", 30), ("EVENT", 13), ("STATE", 9), ("PREVIOUS", 9))


class Output:
    def __init__(self, json_mode: bool) -> None:
        self.json = json_mode
        self.out = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)
        if not self.out.is_terminal:
            self.out.width = 500  # a pipe: no wrapping of long lines (rich would assume 80 columns)

    def emit(self, data: Any) -> None:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")

    @contextlib.contextmanager
    def waiting(self, text: str) -> Iterator[None]:
        """A spinner with elapsed time on stderr while the body runs (TTY, human mode only)."""
        if self.json or not self.err.is_terminal:
            yield
            return
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=self.err, transient=True) as progress:
            progress.add_task(text, total=None)
            yield

    def done(self, vm_id: str, state: pb.VmState | int, verb: str, started: float) -> None:
        """`vm_x  RUNNING  booted in 2.1s` (or the JSON of the outcome)."""
        if self.json:
            self.emit({"vm_id": vm_id, "success": True, "state": state_name(state)})
            return
        line = Text.assemble(
            (vm_id, "bold"), "  ", _state(state), f"  {verb} in {time.monotonic() - started:.1f}s"
        )
        self.out.print(line)

    def vm_list(self, vms: Iterable[pb.VmInfo]) -> None:
        columns = ("VM ID", "STATE", "VCPUS", "MEMORY", "CREATED", "NAME")
        self._listing("vms", list(vms), columns, _vm_row)

    def event_header(self) -> None:
        if not self.json:
            self._row([Text(name) for name, _ in EVENT_COLUMNS] + [Text("REASON")], style="bold")

    def event(self, event: pb.VmEvent) -> None:
        """One VmEvent: a row, or a JSON line (`-o json`); flushed, for a pipe reads it live."""
        if self.json:
            sys.stdout.write(json.dumps(as_json(event)) + "\n")
            sys.stdout.flush()
            return
        kind = pb.VmEventType(event.type).name
        self._row(
            [
                Text(event.cursor),
                Text(_time(event.at, fraction=True)),
                Text(event.vm_id, style="bold"),
                Text(kind),
                _state(event.state) if event.state else Text("-"),
                _state(event.previous_state) if event.previous_state else Text("-"),
                Text(event.reason),
            ]
        )

    def reconnecting(self, error: ApiError | None, cursor: str, pause: float) -> None:
        """`watch --reconnect` says on stderr why and from where it resumes (stdout stays rows)."""
        why = f"{error.code.value}: {error.message}" if error else "the server ended the stream"
        after = f"after cursor {cursor}" if cursor else "with live events"
        self.err.print(f"metalctl: watch broke ({why}); resuming {after} in {pause:.1f}s", soft_wrap=True)

    def _row(self, cells: list[Text], style: str = "") -> None:
        line = Text(style=style)
        for cell, (_, width) in zip(cells, [*EVENT_COLUMNS, ("", 0)], strict=True):
            cell.pad_right(max(width - len(cell), 0))
            line.append_text(cell)
            line.append("  ")
        line.rstrip()
        self.out.print(line, soft_wrap=True)
        self.out.file.flush()

    def snapshot_taken(self, vm_id: str, taken: pb.SnapshotVmResponse, started: float) -> None:
        """`snap_x  12.3 MiB  of vm_a, RUNNING, in 0.4s`."""
        if self.json:
            self.emit(as_json(taken))
            return
        line = Text.assemble(
            (taken.snapshot_id, "bold"),
            f"  {human_bytes(taken.size_bytes)}  of {vm_id}, ",
            _state(taken.state),
            f", in {time.monotonic() - started:.1f}s",
        )
        self.out.print(line)

    def snapshot_list(self, snapshots: Iterable[pb.Snapshot]) -> None:
        columns = ("SNAPSHOT ID", "SOURCE VM", "VCPUS", "MEMORY", "SIZE", "WARM POOL", "CREATED")
        self._listing("snapshots", list(snapshots), columns, _snapshot_row)

    def _listing(
        self, key: str, items: list[M], columns: Sequence[str], row: Callable[[M], Sequence[str | Text]]
    ) -> None:
        """A list command's output: `{key: [...], "total_count": n}` as JSON, or a table of `columns`."""
        if self.json:
            self.emit({key: [as_json(item) for item in items], "total_count": len(items)})
            return
        table = header_table(columns)
        for item in items:
            table.add_row(*row(item))
        self.out.print(table)

    def vm_details(self, info: pb.GetVmInfoResponse) -> None:
        if self.json:
            self.emit(as_json(info))
            return
        config = info.config or pb.VmConfig()
        rows: list[tuple[str, str | Text]] = [
            ("VM ID", info.vm_id),
            ("State", _state(info.state)),
            ("Created", _created(info)),
            ("vCPUs", str(config.cpu.vcpu_count if config.cpu else "")),
            ("Memory", human_bytes(config.memory.size_bytes) if config.memory else ""),
        ]
        if config.boot:
            rows += [("Kernel", config.boot.kernel_path), ("Kernel args", config.boot.kernel_args)]
            rows += [("Initrd", config.boot.initrd_path)]
        for disk in config.storage:
            flags = ", ".join(f for f, on in (("root", disk.is_root_device), ("ro", disk.is_read_only)) if on)
            rows.append((f"Disk {disk.device_id}", f"{disk.path_on_host}" + (f" ({flags})" if flags else "")))
        for nic in info.network_info.interfaces if info.network_info else []:
            addresses = " ".join(a for a in (nic.guest_ipv4, nic.guest_ipv6) if a)
            rows.append((f"NIC {nic.interface_id}", f"{nic.guest_mac} {nic.tap_device} {addresses}".strip()))
        rows += [(f"Metadata {k}", v) for k, v in sorted(config.metadata.items())]
        rows += [(f"Backend {k}", v) for k, v in sorted(info.backend_info.items())]
        if info.metrics:
            m = info.metrics
            rows.append(("CPU time", f"{m.cpu_time_nanos / 1e9:.2f}s"))
            rows.append(("Memory used", human_bytes(m.memory_usage_bytes)))
            rows.append(("Disk r/w", f"{human_bytes(m.disk_read_bytes)} / {human_bytes(m.disk_write_bytes)}"))
            rows.append(
                ("Net rx/tx", f"{human_bytes(m.network_rx_bytes)} / {human_bytes(m.network_tx_bytes)}")
            )
        table = Table(box=None, show_header=False, pad_edge=False)
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for key, value in rows:
            if value:
                table.add_row(key, value)
        self.out.print(table)

    def health(self, body: dict[str, Any]) -> None:
        if self.json:
            self.emit(body)
            return
        status = str(body.get("status"))
        backend, system = body.get("backend", {}), body.get("system", {})
        self.out.print(
            Text.assemble(
                ("metald ", "bold"),
                (status, HEALTH_STYLES.get(status, "")),
                f"  version {body.get('version')}  backend {backend.get('type')}",
                f"  up {system.get('uptime_seconds')}s  rss {system.get('memory_usage_mb')} MiB",
            )
        )
        table = header_table(("CHECK", "STATUS", "MS", "DETAIL"), no_wrap=False)
        for name, check in body.get("checks", {}).items():
            check_status = str(check.get("status"))
            table.add_row(
                name,
                Text(check_status, style=HEALTH_STYLES.get(check_status, "")),
                f"{check.get('duration_ms', 0):.1f}",
                str(check.get("detail", "")),
            )
        self.out.print(table)

    def error(self, error: ApiError) -> int:
        """Report a failed call; the exit status is the gRPC code number."""
        if self.json:
            sys.stderr.write(json.dumps({"error": error.to_dict()}) + "\n")
        else:
            reason = f" [{error.reason}]" if error.reason else ""
            self.err.print(
                Text.assemble(("error: ", "bold red"), f"{error.code.value}: {error.message}{reason}")
            )
        return error.grpc_code

    def failure(self, code: str, message: str, status: int) -> int:
        """A failure that is not an API error (a timeout, a bad file)."""
        if self.json:
            sys.stderr.write(json.dumps({"error": {"code": code, "message": message}}) + "\n")
        else:
            self.err.print(Text.assemble(("error: ", "bold red"), f"{code}: {message}"))
        return status
