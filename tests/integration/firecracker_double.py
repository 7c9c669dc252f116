"""A test double of Firecracker (and of its jailer), answering per Firecracker's published API contract.

Run as a program it behaves like `firecracker --id ID --api-sock PATH` (or like `jailer ... --
--api-sock PATH`): it serves HTTP/1.1 on the Unix socket, validates every request body against the
JSON Schema made from the spec's `definitions` (400 with a fault_message when it does not fit), keeps
the instance state, writes the serial console, metrics and log files it is configured with, and
records every request in `$FC_DOUBLE_DIR/calls.ndjson`. Snapshots as Firecracker takes and loads
them: create only when paused, load only into a fresh process, the drives reopened at the paths the
state recorded, network_overrides applied. Behaviour switches are read from
`$FC_DOUBLE_DIR/behaviour.json` at start (`ignore_ctrl_alt_del`: the guest never reacts).

Imported by the tests it also gives the contract (`Contract`), the fake binaries (`FakeFirecracker`)
and a LaunchSpec factory. Nothing outside tests/ uses it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import yaml

from metald.ports import DiskSpec, LaunchSpec, NicSpec

if TYPE_CHECKING:  # not at run time: the double runs as the fake firecracker, and starts quickly
    from metald.backends.firecracker import FirecrackerBackend

REPO = Path(__file__).resolve().parents[2]
SPEC_PATH = Path(
    os.environ.get("METALD_FIRECRACKER_SPEC") or REPO.parent / "shared/reference/firecracker-api-v1.17.yaml"
)
_FC_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request"}


# ---- the contract ----------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """Swagger objects allow unknown members, Firecracker (serde deny_unknown_fields) does not."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


class Contract:
    """Firecracker's Swagger 2.0 spec as JSON Schema validators, one per operation with a body."""

    def __init__(self, path: Path = SPEC_PATH) -> None:
        with open(path) as f:
            self.spec: dict[str, Any] = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        self.definitions = strict(copy.deepcopy(self.spec["definitions"]))
        self._templates = [
            (re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(t)) + "$"), t)
            for t in self.spec["paths"]
        ]

    def template(self, path: str) -> str | None:
        """The spec path that `path` instantiates (`/drives/rootfs` -> `/drives/{drive_id}`)."""
        return next((t for rx, t in self._templates if rx.match(path)), None)

    def operation(self, method: str, path: str) -> dict[str, Any] | None:
        template = self.template(path)
        if template is None:
            return None
        op = self.spec["paths"][template].get(method.lower())
        return op if isinstance(op, dict) else None

    def body_schema(self, method: str, path: str) -> tuple[dict[str, Any], bool] | None:
        """(JSON Schema of the body, required) for an operation that takes one."""
        op = self.operation(method, path)
        for param in (op or {}).get("parameters", []):
            if param.get("in") == "body":
                return {**strict(param["schema"]), "definitions": self.definitions}, bool(
                    param.get("required")
                )
        return None

    def errors(self, method: str, path: str, body: Any) -> list[str]:
        """Every way this request breaks the contract (empty: it fits)."""
        if self.operation(method, path) is None:
            return [f"{method} {path} is not in the spec's paths"]
        schema = self.body_schema(method, path)
        if schema is None:
            return [] if body is None else [f"{method} {path} takes no body"]
        if body is None:
            return [f"{method} {path} requires a body"] if schema[1] else []
        validator = jsonschema.Draft4Validator(schema[0])
        return [
            f"{'/'.join(map(str, e.absolute_path)) or '<body>'}: {e.message}"
            for e in validator.iter_errors(body)
        ]


# ---- the double ------------------------------------------------------------------------------

PRE_BOOT_ONLY_EXCEPT = ("/actions", "/mmds", "/vm", "/snapshot/create")
BEFORE_LOAD = {"logger", "metrics"}  # /snapshot/load: "before configuring any resource other than"
BOOT_OUTPUT = "Linux version 6.1.0 (firecracker test double)\n"
READY_DELAY = 0.3
FLUSH_DELTAS = {
    "block": {"read_bytes": 4096, "write_bytes": 1024},
    "net": {"rx_bytes_count": 300, "tx_bytes_count": 200},
}


class Double:
    def __init__(self, contract: Contract, fc_id: str, chroot: Path | None, work: Path) -> None:
        self.contract = contract
        self.fc_id = fc_id
        self.chroot = chroot
        self.work = work
        self.state = "Not started"
        self.config: dict[str, Any] = {}
        self.restored = False
        behaviour = work / "behaviour.json"
        self.behaviour = json.loads(behaviour.read_text()) if behaviour.exists() else {}

    def host(self, path: str) -> Path:
        """Where a path given by the client is on the host (inside the chroot when jailed)."""
        return self.chroot / path.lstrip("/") if self.chroot else Path(path)

    def record(self, entry: dict[str, Any]) -> None:
        with open(self.work / "calls.ndjson", "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "t": time.time(), **entry}) + "\n")

    def respond(self, method: str, path: str, raw: bytes) -> tuple[int, Any]:
        try:
            body = json.loads(raw) if raw else None
        except ValueError as exc:
            status, payload = 400, {"fault_message": f"invalid JSON: {exc}"}
        else:
            status, payload = self._respond(method, path, body)
        self.record({"method": method, "path": path, "body": body, "status": status})
        return status, payload

    def _respond(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if self.contract.operation(method, path) is None:
            return 400, {"fault_message": f"Invalid request method and/or path: {method} {path}"}
        errors = self.contract.errors(method, path, body)
        if errors:
            return 400, {"fault_message": "; ".join(errors)}
        template = self.contract.template(path)
        if method == "GET":
            return 200, self._get(template)
        if method == "PUT" and template not in PRE_BOOT_ONLY_EXCEPT and self.state != "Not started":
            return 400, {
                "fault_message": "The requested operation is not supported after starting the microVM."
            }
        try:
            fault = self._apply(method, template, path, body)
        except OSError as exc:
            fault = f"{exc.strerror}: {exc.filename}"
        return (400, {"fault_message": fault}) if fault else (204, None)

    def _get(self, template: str | None) -> Any:
        if template == "/version":
            return {"firecracker_version": "1.17.0-double"}
        if template == "/machine-config":
            return self.config.get("machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        return {
            "app_name": "Firecracker",
            "id": self.fc_id,
            "state": self.state,
            "vmm_version": "1.17.0-double",
        }

    def _apply(self, method: str, template: str | None, path: str, body: Any) -> str:
        """Carry out a valid request; a non-empty result is Firecracker's refusal."""
        if template in ("/logger", "/metrics"):
            key = "log_path" if template == "/logger" else "metrics_path"
            with open(self.host(body[key]), "a"):
                pass
        elif template in ("/drives/{drive_id}", "/boot-source"):
            for key in ("path_on_host", "kernel_image_path", "initrd_path"):
                if key in body and not self.host(body[key]).is_file():
                    return f"cannot open {key} {body[key]}"
        elif template == "/actions":
            return self._action(body["action_type"])
        elif template == "/snapshot/create":
            return self._snapshot_create(body)
        elif template == "/snapshot/load":
            return self._snapshot_load(body)
        elif template == "/vm":
            if self.state == "Not started":
                return "the microVM is not running"
            self.state = "Paused" if body["state"] == "Paused" else "Running"
            return ""
        if method == "PUT":
            self.config[path.strip("/")] = body
        return ""

    def _snapshot_create(self, body: dict[str, Any]) -> str:
        """Like Firecracker: only of a paused microVM; the device state names every drive's path
        and TAP as configured, the memory file has the guest's whole size."""
        if self.state != "Paused":
            return f"Create snapshot error: the microVM must be paused (it is {self.state})"
        if body.get("snapshot_type", "Full") != "Full":
            return "Diff snapshots need track_dirty_pages"
        mem_bytes = self.config["machine-config"]["mem_size_mib"] << 20
        with open(self.host(body["mem_file_path"]), "wb") as f:
            f.write(f"guest memory of {self.fc_id}\n".encode())
            f.truncate(mem_bytes)
        state = {"mem_bytes": mem_bytes, "config": self.config, "source": self.fc_id}
        self.host(body["snapshot_path"]).write_text(json.dumps(state))
        return ""

    def _snapshot_load(self, body: dict[str, Any]) -> str:
        """Like Firecracker: a fresh process only; the memory file fits the state; the drives are
        reopened at their recorded paths; each override names an interface of the snapshot."""
        if self.state != "Not started" or set(self.config) - BEFORE_LOAD:
            return "Loading a microVM snapshot not allowed after configuring boot-specific resources."
        if ("mem_backend" in body) == ("mem_file_path" in body):
            return "exactly one of mem_backend and mem_file_path must be given"
        backend = body.get("mem_backend", {"backend_type": "File", "backend_path": body.get("mem_file_path")})
        if backend["backend_type"] != "File":
            return "the double serves memory from a file only"
        state = json.loads(self.host(body["snapshot_path"]).read_text())
        mem = self.host(backend["backend_path"])
        with open(mem, "rb") as f:
            head = f.read(12)
        if mem.stat().st_size != state["mem_bytes"] or head != b"guest memory":
            return f"memory file {backend['backend_path']} does not fit the snapshot"
        config: dict[str, Any] = state["config"]
        for key, drive in config.items():
            if key.startswith("drives/") and not self.host(drive["path_on_host"]).is_file():
                return f"Block device error: cannot open {drive['path_on_host']}"
        for override in body.get("network_overrides", []):
            key = f"network-interfaces/{override['iface_id']}"
            if key not in config:
                return f"network override for unknown interface {override['iface_id']}"
            config[key] = {**config[key], "host_dev_name": override["host_dev_name"]}
        self.config = {**config, **{k: v for k, v in self.config.items() if k in BEFORE_LOAD}}
        self.restored = True
        self.state = "Running" if body.get("resume_vm") else "Paused"
        return ""

    def _action(self, action: str) -> str:
        if action == "InstanceStart":
            if self.state != "Not started":
                return "the microVM is already running"
            if "boot-source" not in self.config:
                return "no boot source configured"
            self.state = "Running"
            self._boot()
        elif action == "FlushMetrics":
            metrics = self.config.get("metrics")
            if metrics is None:
                return "metrics system not initialized"
            with open(self.host(metrics["metrics_path"]), "a") as f:
                f.write(json.dumps({"utc_timestamp_ms": int(time.time() * 1000), **FLUSH_DELTAS}) + "\n")
        elif action == "SendCtrlAltDel":
            if self.state == "Not started":
                return "the microVM is not running"
            if not self.behaviour.get("ignore_ctrl_alt_del"):
                # The guest reboots; with reboot=k that ends Firecracker, with exit code 0.
                asyncio.get_running_loop().call_later(0.05, os._exit, 0)
        return ""

    def _boot(self) -> None:
        """Play a guest: print to the serial console, and later the ready line the guest image prints."""
        args = self.config["boot-source"].get("boot_args", "")
        vm_id = next((a.split("=", 1)[1] for a in args.split() if a.startswith("metald.vm_id=")), "")
        serial = self.config.get("serial", {}).get("serial_out_path")

        def write(text: str) -> None:
            if serial:
                with open(self.host(serial), "r+") as f:  # like Firecracker: no O_APPEND, no O_TRUNC
                    f.seek(0, os.SEEK_END)
                    f.write(text)
            else:
                sys.stdout.write(text)
                sys.stdout.flush()

        write(BOOT_OUTPUT)
        asyncio.get_running_loop().call_later(READY_DELAY, write, f"METALD_READY vm_id={vm_id} \n")

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                method, target, _ = line.decode().split(" ", 2)
                length = 0
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode().partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                raw = await reader.readexactly(length) if length else b""
                status, payload = self.respond(method, target, raw)
                data = json.dumps(payload).encode() if payload is not None else b""
                head = f"HTTP/1.1 {status} {_REASONS[status]}\r\nServer: Firecracker API\r\n"
                head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                writer.write(head.encode() + data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, Path | None]:
    """Firecracker's flags, or the jailer's (recognised by --exec-file) followed by `--` and Firecracker's."""
    if "--exec-file" in argv:
        split = list(argv).index("--") if "--" in argv else len(argv)
        jailer = argparse.ArgumentParser(prog="jailer")
        for flag in ("--id", "--exec-file", "--uid", "--gid"):
            jailer.add_argument(flag, required=True)
        jailer.add_argument("--chroot-base-dir", default="/srv/jailer")
        jailer.add_argument("--cgroup-version", choices=("1", "2"), default="1")
        jailer.add_argument("--cgroup", action="append", default=[])
        jailer.add_argument("--resource-limit", action="append", default=[])
        jailer.add_argument("--parent-cgroup")
        jailer.add_argument("--netns")
        jailer.add_argument("--daemonize", action="store_true")
        jailer.add_argument("--new-pid-ns", action="store_true")
        jail = jailer.parse_args(argv[:split])
        if "firecracker" not in os.path.basename(jail.exec_file):
            jailer.error("--exec-file name must contain 'firecracker'")
        chroot = Path(jail.chroot_base_dir) / os.path.basename(jail.exec_file) / jail.id / "root"
        argv = ["--id", jail.id, *argv[split + 1 :]]
    else:
        chroot = None
    parser = argparse.ArgumentParser(prog="firecracker")
    parser.add_argument("--id", default="anonymous-instance")
    parser.add_argument("--api-sock", default="/run/firecracker.socket")
    parser.add_argument("--version", action="store_true")
    args = parser.parse_args(argv)
    if not _FC_ID.fullmatch(args.id):
        parser.error(f"invalid instance id {args.id!r}")
    return args, chroot


async def _main(argv: Sequence[str]) -> int:
    args, chroot = _parse(argv)
    if args.version:
        print("Firecracker v1.17.0-double")
        return 0
    work = Path(os.environ["FC_DOUBLE_DIR"])
    if chroot is not None:
        chroot.mkdir(parents=True, exist_ok=True)
        os.chdir(chroot)  # the jailer leaves Firecracker in its chroot's root
    double = Double(Contract(), args.id, chroot, work)
    double.record({"argv": list(argv), "cwd": os.getcwd()})
    server = await asyncio.start_unix_server(double.serve_connection, path=str(double.host(args.api_sock)))
    async with server:
        await server.serve_forever()
    return 0


# ---- what the tests use ----------------------------------------------------------------------


@dataclass(frozen=True)
class FakeFirecracker:
    """`firecracker` and `jailer` programs in `root` that run this double and record into it."""

    root: Path

    @property
    def binary(self) -> Path:
        return self.root / "firecracker"

    @property
    def jailer(self) -> Path:
        return self.root / "jailer"

    @classmethod
    def install(cls, root: Path) -> FakeFirecracker:
        root.mkdir(parents=True, exist_ok=True)
        fake = cls(root)
        script = (
            f"#!/bin/sh\nFC_DOUBLE_DIR='{root}' PYTHONPATH='{REPO}' "
            f"exec '{sys.executable}' '{Path(__file__).resolve()}' \"$@\"\n"
        )
        for path in (fake.binary, fake.jailer):
            path.write_text(script)
            path.chmod(0o755)
        return fake

    def behave(self, **switches: bool) -> None:
        """Behaviour of the doubles started from now on."""
        (self.root / "behaviour.json").write_text(json.dumps(switches))

    def records(self) -> list[dict[str, Any]]:
        path = self.root / "calls.ndjson"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def requests(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if "method" in r]

    def calls(self) -> list[tuple[str, str]]:
        """(method, path) of every request, in order, over every process started."""
        return [(r["method"], r["path"]) for r in self.requests()]

    def clear(self) -> None:
        (self.root / "calls.ndjson").unlink(missing_ok=True)

    def backend(self, root: Path, *, jailed: bool = False, **options: Any) -> FirecrackerBackend:
        """A FirecrackerBackend that runs this double (jailed: through its jailer, chroots under
        `root`/jail), with no VMM user, for an x86_64 host unless `options` say otherwise."""
        from metald.backends.firecracker import FirecrackerBackend

        return FirecrackerBackend(
            firecracker_binary=str(self.binary),
            jailer_binary=str(self.jailer) if jailed else "",
            chroot_base=root / "jail",
            vmm_uid=None,
            vmm_gid=None,
            **{"machine": "x86_64", **options},
        )


def launch_spec(
    root: Path,
    vm_id: str = "vm_test-1",
    *,
    vcpus: int = 1,
    memory_mib: int = 128,
    cpu_template: str = "",
    initrd: bool = False,
    disks: Sequence[tuple[str, bool, bool]] = (("rootfs", False, True),),
    nics: Sequence[NicSpec] = (),
    console_type: str = "SERIAL",
    kernel_args: str = "",
) -> LaunchSpec:
    """A VM whose assets (dummy kernel, initrd, sparse images) are made under `root`/assets.

    `disks`: (device_id, read_only, is_root) each.
    """
    assets = root / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "vmlinux").write_bytes(b"\x7fELF kernel")
    (assets / "initrd").write_bytes(b"initrd")
    specs = []
    for device_id, read_only, is_root in disks:
        image = assets / f"{device_id}.img"
        with open(image, "wb") as f:
            f.write(b"superblock")
            f.truncate(4 << 20)
        specs.append(DiskSpec(device_id, image, read_only, is_root))
    vm_dir = root / "vms" / vm_id
    return LaunchSpec(
        vm_id=vm_id,
        vm_dir=vm_dir,
        vcpu_count=vcpus,
        memory_bytes=memory_mib << 20,
        cpu_template=cpu_template,
        kernel=assets / "vmlinux",
        initrd=assets / "initrd" if initrd else None,
        customer_kernel_args=kernel_args,
        guest_kernel_args=f"metald.vm_id={vm_id}",
        disks=tuple(specs),
        nics=tuple(nics),
        netns=None,
        console_type=console_type,
        console_path=vm_dir / "console.log",
    )


@contextlib.asynccontextmanager
async def closing_backends(root: Path) -> AsyncIterator[list[FirecrackerBackend]]:
    """A list for the backends a test makes; afterwards they are closed and every VMM left under
    `root` is killed."""
    made: list[FirecrackerBackend] = []
    yield made
    for backend in made:
        await backend.close()
    await destroy_leftovers(root)


async def destroy_leftovers(root: Path) -> None:
    """Kill every supervised VMM a test left under `root` and remove its files (a vm_dir is named
    after its VM, as in launch_spec)."""
    from metald.backends.firecracker import FirecrackerBackend

    sweeper = FirecrackerBackend(
        firecracker_binary="firecracker", chroot_base=root, vmm_uid=None, vmm_gid=None
    )
    for state in await asyncio.to_thread(lambda: list(root.rglob("vmm.json"))):
        await sweeper.destroy(state.parent.name, state.parent)


if __name__ == "__main__":
    sys.exit(asyncio.run(_main(sys.argv[1:])))
