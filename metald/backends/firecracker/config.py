"""LaunchSpec -> the Firecracker API requests that configure and boot a VM. Pure functions.

Rate limits. The reference's `rate_limit` {bandwidth_bytes_per_second, burst_bytes,
refill_time_millis} applies to each direction of an interface, so it becomes the same `bandwidth`
TokenBucket for `rx_rate_limiter` and `tx_rate_limiter`:
- refill_time = refill_time_millis (1000 when 0: Firecracker disables a bucket whose refill_time is 0),
- size = the bytes earned per refill interval, bandwidth * refill_time / 1000 (at least 1), so the
  sustained rate is the requested bandwidth,
- one_time_burst = burst_bytes: an initial extra budget, spent before the refill-limited rate applies.
A bandwidth of 0 means unlimited: no limiter is sent. Drives have no limit in the reference API.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metald.backends.firecracker.api import ApiCall
from metald.backends.firecracker.layout import METRICS, VMM_LOG, Layout
from metald.domain.errors import invalid
from metald.domain.model import RateLimit
from metald.ports import DiskSpec, LaunchSpec, NicSpec

MIB = 1024 * 1024
DEFAULT_REFILL_MS = 1000
LOG_LEVEL = "Info"
X86_TEMPLATES = ("T2", "T2S", "T2CL", "T2A")
ARM_TEMPLATES = ("V1N1",)


def cpu_templates(machine: str) -> Mapping[str, str]:
    """Firecracker's static templates for this host's architecture, under their own names."""
    if machine in ("x86_64", "amd64"):
        return {name: name for name in X86_TEMPLATES}
    if machine in ("aarch64", "arm64"):
        return {name: name for name in ARM_TEMPLATES}
    return {}


def token_bucket(limit: RateLimit) -> dict[str, int] | None:
    if limit.bandwidth_bytes_per_second <= 0:
        return None
    refill_ms = limit.refill_time_millis or DEFAULT_REFILL_MS
    bucket = {
        "size": max(1, limit.bandwidth_bytes_per_second * refill_ms // 1000),
        "refill_time": refill_ms,
    }
    if limit.burst_bytes > 0:
        bucket["one_time_burst"] = limit.burst_bytes
    return bucket


def _has_arg(args: list[str], key: str) -> bool:
    return any(a == key or a.startswith(key + "=") for a in args)


def boot_args(spec: LaunchSpec) -> str:
    """The customer's arguments, then what Firecracker guests need unless the customer set it, then
    metald's guest arguments. `reboot=k`: a guest reboot (which is how SendCtrlAltDel ends a guest)
    makes Firecracker exit. Firecracker adds `root=/dev/vda ro|rw` and `pci=off` itself."""
    customer = spec.customer_kernel_args.split()
    ours = [
        arg
        for key, arg in (("console", "console=ttyS0"), ("reboot", "reboot=k"), ("panic", "panic=1"))
        if not _has_arg(customer, key)
    ]
    return " ".join([*customer, *ours, *spec.guest_kernel_args.split()])


def machine_config(spec: LaunchSpec, cpu_templates: Mapping[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "vcpu_count": spec.vcpu_count,
        "mem_size_mib": -(-spec.memory_bytes // MIB),
        "smt": False,
    }
    if spec.cpu_model is not None:  # decided by the service
        if spec.cpu_model:
            body["cpu_template"] = spec.cpu_model
    elif spec.cpu_template:
        if spec.cpu_template not in cpu_templates:
            raise invalid("config.cpu.cpu_template", f"{spec.cpu_template} is not available on this host")
        body["cpu_template"] = cpu_templates[spec.cpu_template]
    return body


def boot_source(spec: LaunchSpec, layout: Layout) -> dict[str, Any]:
    body = {"kernel_image_path": layout.kernel(spec), "boot_args": boot_args(spec)}
    initrd = layout.initrd(spec)
    if initrd is not None:
        body["initrd_path"] = initrd
    return body


def drive(disk: DiskSpec, layout: Layout) -> dict[str, Any]:
    return {
        "drive_id": disk.device_id,
        "path_on_host": layout.drive(disk),
        "is_root_device": disk.is_root,
        "is_read_only": disk.read_only,
    }


def network_interface(nic: NicSpec) -> dict[str, Any]:
    body: dict[str, Any] = {
        "iface_id": nic.interface_id,
        "host_dev_name": nic.tap_device,
        "guest_mac": nic.mac,
    }
    bucket = token_bucket(nic.rate_limit) if nic.rate_limit else None
    if bucket is not None:
        body["rx_rate_limiter"] = {"bandwidth": bucket}
        body["tx_rate_limiter"] = {"bandwidth": dict(bucket)}
    return body


def output_calls(layout: Layout) -> list[ApiCall]:
    """Firecracker's own log and metrics: the only resources a snapshot load may follow."""
    return [
        ApiCall("PUT", "/logger", {"log_path": layout.vmm(VMM_LOG), "level": LOG_LEVEL, "show_level": True}),
        ApiCall("PUT", "/metrics", {"metrics_path": layout.vmm(METRICS)}),
    ]


def configure_calls(spec: LaunchSpec, layout: Layout, cpu_templates: Mapping[str, str]) -> list[ApiCall]:
    """Every request before InstanceStart, in order; raises MetaldError for what cannot be honoured."""
    if spec.console_type != "SERIAL":
        raise invalid(
            "config.console.type", f"{spec.console_type} is not supported by Firecracker (serial only)"
        )
    calls = [
        *output_calls(layout),
        ApiCall("PUT", "/machine-config", machine_config(spec, cpu_templates)),
        ApiCall("PUT", "/boot-source", boot_source(spec, layout)),
    ]
    for disk in spec.disks:
        calls.append(ApiCall("PUT", f"/drives/{disk.device_id}", drive(disk, layout)))
    for nic in spec.nics:
        calls.append(ApiCall("PUT", f"/network-interfaces/{nic.interface_id}", network_interface(nic)))
    calls.append(ApiCall("PUT", "/serial", {"serial_out_path": layout.console(spec)}))
    return calls


START = ApiCall("PUT", "/actions", {"action_type": "InstanceStart"})
