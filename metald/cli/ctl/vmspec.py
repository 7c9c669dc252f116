"""`metalctl create` input: a JSON/YAML file in the reference's CreateVm format (or a bare
VmConfig), overridden by flags for the common cases."""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "KIB": 1 << 10,
    "KB": 1000,
    "M": 1 << 20,
    "MIB": 1 << 20,
    "MB": 1000**2,
    "G": 1 << 30,
    "GIB": 1 << 30,
    "GB": 1000**3,
}


def parse_size(text: str) -> int:
    """`512MiB`, `512M` (binary), `512MB` (decimal), `1GiB`, `1073741824` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def metadata_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def load_file(path: Path) -> tuple[str, dict[str, Any]]:
    """(vm_id, config) from a CreateVm request ({"vm_id", "config"}) or a bare config; `-` is
    standard input. YAML is a superset of JSON, so one parser reads both."""
    data = yaml.safe_load(sys.stdin if str(path) == "-" else path.read_text())
    if data is None:
        return "", {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping (a CreateVm request or a VmConfig)")
    if "config" in data:
        return str(data.get("vm_id") or ""), dict(data["config"] or {})
    return "", data


def build(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The VM id and config for `metalctl create`, file first, then each flag given."""
    vm_id, config = load_file(args.file) if args.file else ("", {})
    config = copy.deepcopy(config)
    if args.vcpus is not None:
        config.setdefault("cpu", {})["vcpu_count"] = args.vcpus
    if args.cpu_template:
        config.setdefault("cpu", {})["cpu_template"] = args.cpu_template
    if args.memory is not None:
        config.setdefault("memory", {})["size_bytes"] = args.memory
    boot = {"kernel_path": args.kernel, "kernel_args": args.kernel_args, "initrd_path": args.initrd}
    for key, value in boot.items():
        if value is not None:
            config.setdefault("boot", {})[key] = value
    if args.rootfs:
        storage = [d for d in config.get("storage", []) if not d.get("is_root_device")]
        config["storage"] = [
            {"device_id": "rootfs", "path_on_host": args.rootfs, "is_root_device": True},
            *storage,
        ]
    for i, disk in enumerate(args.disk):
        path, _, mode = disk.partition(":")
        config.setdefault("storage", []).append(
            {"device_id": f"disk{i + 1}", "path_on_host": path, "is_read_only": mode == "ro"}
        )
    if args.net and not config.get("network"):
        config["network"] = [{"interface_id": "eth0", "type": "TAP", "guest_mac": "auto"}]
    if args.console_type:
        config.setdefault("console", {})["type"] = args.console_type
    for key, value in args.metadata:
        config.setdefault("metadata", {})[key] = value
    return args.vm_id or vm_id, config
