"""Checks of a requested VmConfig, and the defaults a bare config gets. Pure: no I/O."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from metald.domain.errors import invalid
from metald.domain.model import (
    MIB,
    BootConfig,
    ConsoleConfig,
    CpuConfig,
    IpConfig,
    MemoryConfig,
    NetworkInterface,
    RateLimit,
    StorageDevice,
    VmConfig,
)

CPU_TEMPLATES = frozenset({"T2", "T2S", "T2CL", "T2A", "V1N1"})
CONSOLE_TYPES = frozenset({"SERIAL", "VIRTIO_CONSOLE"})
NETWORK_TYPES = frozenset({"TAP"})
MIN_MEMORY_BYTES = 128 * MIB
MAX_MEMORY_BYTES = 1024 * 1024 * MIB
MAX_VCPUS = 32
ASSETS_PREFIX = "/assets/"
DEFAULT_KERNEL = "/assets/vmlinux"
DEFAULT_INITRD = "/assets/initrd"
DEFAULT_ROOTFS = "/assets/rootfs.ext4"
RESERVED_ARG_PREFIX = "metald."
# Prefix lengths a customer may give its explicit guest and host-side networks: no larger than a
# /16 (v4) or /48 (v6), so one customer cannot claim the address space others need, and with room
# for a guest and its gateway (/30, /126).
PREFIX_BOUNDS = {4: (16, 30), 6: (48, 126)}
# Token-bucket bounds tc can honour: the rate in bits as a 64-bit number, the bucket in 32 bits.
MAX_BANDWIDTH = 2**40  # bytes/s
MAX_BUCKET = 2**32 - 1  # bytes
MAX_REFILL_MS = 3_600_000
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
# The console log shares the VM's directory with files the daemon and the VMM trust (sockets,
# overlays, pid/state JSON). The guest writes whatever it likes into its console, so the console
# may only be a `.log` file, and not one of the logs metald itself writes there.
_CONSOLE_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,59}\.log")
RESERVED_LOG_NAMES = frozenset({"vmm.log", "serial.log", "firecracker.log"})


# Fixed request bounds (the settable ones are Limits).
MAX_METADATA_KEY_LENGTH = 128
MAX_METADATA_VALUE_LENGTH = 1024
MAX_DEVICES = 16
MAX_INTERFACES = 8


@dataclass(frozen=True)
class Limits:
    """The request bounds an operator sets (settings max_metadata_entries, max_kernel_args_length)."""

    max_metadata_entries: int = 64
    max_kernel_args_length: int = 2048


@dataclass(frozen=True)
class Defaults:
    vcpu_count: int = 1
    memory_bytes: int = 256 * MIB


def validate_config(config: VmConfig, limits: Limits) -> None:
    """Raise INVALID_ARGUMENT naming the first offending field."""
    _check_cpu(config.cpu)
    _check_memory(config.memory)
    if config.boot is not None:
        _check_boot(config.boot, limits)
    _check_storage(config.storage)
    _check_network(config.network)
    if config.console is not None:
        _check_console(config.console)
    validate_metadata(config.metadata, limits)


def with_defaults(config: VmConfig, defaults: Defaults) -> VmConfig:
    """Fill what the caller left out. Zero vcpu_count/size_bytes mean "not given" (proto3 has no
    presence for scalars). A config without `boot` gets the default guest; without `boot` and
    `storage` it also gets the default root disk."""
    cpu = config.cpu or CpuConfig()
    if cpu.vcpu_count == 0:
        cpu = dataclasses.replace(cpu, vcpu_count=defaults.vcpu_count)
    memory = config.memory or MemoryConfig()
    if memory.size_bytes == 0:
        memory = MemoryConfig(size_bytes=defaults.memory_bytes)
    boot = config.boot
    storage = config.storage
    if boot is None:
        boot = BootConfig(kernel_path=DEFAULT_KERNEL, initrd_path=DEFAULT_INITRD)
        if not storage:
            storage = (StorageDevice("rootfs", DEFAULT_ROOTFS, is_read_only=False, is_root_device=True),)
    network = tuple(
        dataclasses.replace(n, type=n.type or "TAP", guest_mac=n.guest_mac or "auto") for n in config.network
    )
    console = config.console or ConsoleConfig()
    if not console.type:
        console = dataclasses.replace(console, type="SERIAL")
    return dataclasses.replace(
        config, cpu=cpu, memory=memory, boot=boot, storage=storage, network=network, console=console
    )


def _check_cpu(cpu: CpuConfig | None) -> None:
    if cpu is None:
        return
    if not 0 <= cpu.vcpu_count <= MAX_VCPUS:
        raise invalid("config.cpu.vcpu_count", f"must be between 1 and {MAX_VCPUS}")
    if cpu.cpu_template and cpu.cpu_template not in CPU_TEMPLATES:
        raise invalid(
            "config.cpu.cpu_template", f"must be empty or one of {', '.join(sorted(CPU_TEMPLATES))}"
        )


def _check_memory(memory: MemoryConfig | None) -> None:
    if memory is None or memory.size_bytes == 0:
        return
    if memory.size_bytes < MIN_MEMORY_BYTES:
        raise invalid("config.memory.size_bytes", "must be at least 134217728 (128 MiB)")
    if memory.size_bytes > MAX_MEMORY_BYTES:
        raise invalid("config.memory.size_bytes", "must be at most 1 TiB")
    if memory.size_bytes % MIB:
        raise invalid("config.memory.size_bytes", "must be a whole number of MiB")


def _check_asset_path(path: str, field: str) -> None:
    if not path.startswith(ASSETS_PREFIX):
        raise invalid(field, f"must be a path under {ASSETS_PREFIX} (the host's image directory)")
    rest = path[len(ASSETS_PREFIX) :]
    parts = rest.split("/")
    if not rest or any(p in ("", ".", "..") for p in parts) or "\x00" in rest:
        raise invalid(field, "must name a file under /assets/ without '.', '..' or empty segments")


def _check_boot(boot: BootConfig, limits: Limits) -> None:
    if not boot.kernel_path:
        raise invalid("config.boot.kernel_path", "is required")
    _check_asset_path(boot.kernel_path, "config.boot.kernel_path")
    if boot.initrd_path:
        _check_asset_path(boot.initrd_path, "config.boot.initrd_path")
    if len(boot.kernel_args) > limits.max_kernel_args_length:
        raise invalid("config.boot.kernel_args", f"longer than {limits.max_kernel_args_length} characters")
    if not boot.kernel_args.isprintable():
        raise invalid("config.boot.kernel_args", "must be printable text")
    if boot.kernel_args.count('"') % 2:
        # An open quote would swallow the arguments metald appends after the customer's.
        raise invalid("config.boot.kernel_args", "has an unbalanced double quote")
    for token in boot.kernel_args.split():
        # Quotes are stripped as the kernel strips them: '"metald.vm_id=x"' is metald.vm_id.
        if token.replace('"', "").startswith(RESERVED_ARG_PREFIX):
            raise invalid("config.boot.kernel_args", f"'{RESERVED_ARG_PREFIX}*' arguments are set by metald")


def _check_ids(field: str, ids: Sequence[str], id_name: str, most: int, noun: str) -> None:
    """At most `most` entries in the list `field`, each named by a valid id, no id twice."""
    if len(ids) > most:
        raise invalid(field, f"at most {most} {noun}")
    seen: set[str] = set()
    for i, value in enumerate(ids):
        where = f"{field}[{i}].{id_name}"
        if not _NAME.fullmatch(value):
            raise invalid(where, "must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
        if value in seen:
            raise invalid(where, f"duplicate {id_name} {value!r}")
        seen.add(value)


def _check_storage(storage: tuple[StorageDevice, ...]) -> None:
    _check_ids("config.storage", [d.device_id for d in storage], "device_id", MAX_DEVICES, "devices")
    for i, dev in enumerate(storage):
        field = f"config.storage[{i}]"
        if not dev.path_on_host:
            raise invalid(f"{field}.path_on_host", "is required")
        _check_asset_path(dev.path_on_host, f"{field}.path_on_host")
    if sum(dev.is_root_device for dev in storage) > 1:
        raise invalid("config.storage", "at most one device may have is_root_device=true")


def _check_network(network: tuple[NetworkInterface, ...]) -> None:
    ids = [nic.interface_id for nic in network]
    _check_ids("config.network", ids, "interface_id", MAX_INTERFACES, "interfaces")
    for i, nic in enumerate(network):
        field = f"config.network[{i}]"
        if nic.type and nic.type not in NETWORK_TYPES:
            raise invalid(f"{field}.type", "must be TAP")
        if nic.guest_mac and nic.guest_mac != "auto":
            check_mac(nic.guest_mac, f"{field}.guest_mac")
        if nic.rate_limit is not None:
            check_rate_limit(nic.rate_limit, f"{field}.rate_limit")
        _check_ip(nic.host_ipv4, 4, f"{field}.host_ipv4")
        _check_ip(nic.guest_ipv4, 4, f"{field}.guest_ipv4")
        _check_ip(nic.host_ipv6, 6, f"{field}.host_ipv6")
        _check_ip(nic.guest_ipv6, 6, f"{field}.guest_ipv6")


def check_rate_limit(limit: RateLimit, field: str) -> None:
    """Each value within what tc can honour, and the bucket (the larger of burst_bytes and one
    refill period's worth) within 32 bits."""
    for name, value, top in (
        ("bandwidth_bytes_per_second", limit.bandwidth_bytes_per_second, MAX_BANDWIDTH),
        ("burst_bytes", limit.burst_bytes, MAX_BUCKET),
        ("refill_time_millis", limit.refill_time_millis, MAX_REFILL_MS),
    ):
        if value < 0:
            raise invalid(f"{field}.{name}", "must not be negative")
        if value > top:
            raise invalid(f"{field}.{name}", f"must be between 0 and {top}")
    refill = limit.bandwidth_bytes_per_second * limit.refill_time_millis // 1000
    if limit.bandwidth_bytes_per_second > 0 and refill > MAX_BUCKET:
        raise invalid(f"{field}.refill_time_millis", "bandwidth x refill time exceeds the largest bucket")


def check_mac(mac: str, field: str) -> str:
    if not _MAC.fullmatch(mac):
        raise invalid(field, 'must be "auto" or a MAC like aa:bb:cc:dd:ee:ff')
    first = int(mac[:2], 16)
    if first & 1:
        raise invalid(field, "must be a unicast MAC (multicast bit set)")
    if mac.replace(":", "").strip("0") == "":
        raise invalid(field, "must not be all zeros")
    return mac.lower()


def _check_ip(ip: IpConfig | None, family: int, field: str) -> None:
    if ip is None:
        return
    if not ip.address:
        raise invalid(f"{field}.address", "is required when the block is given")
    address = _parse_ip(ip.address, family, f"{field}.address")
    if reason := _unusable(address, gateway=False):
        raise invalid(f"{field}.address", f"{ip.address!r} is {reason}")
    if ip.gateway:
        gateway = _parse_ip(ip.gateway, family, f"{field}.gateway")
        if reason := _unusable(gateway, gateway=True):
            raise invalid(f"{field}.gateway", f"{ip.gateway!r} is {reason}")
    shortest, longest = PREFIX_BOUNDS[family]
    if not shortest <= ip.prefix_length <= longest:
        raise invalid(f"{field}.prefix_length", f"must be between {shortest} and {longest}")
    network = ipaddress.ip_network((address, ip.prefix_length), strict=False)
    if family == 4 and address in (network.network_address, network.broadcast_address):
        raise invalid(f"{field}.address", f"{ip.address!r} is the network or broadcast address of {network}")


def _parse_ip(value: str, family: int, field: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        parsed = ipaddress.ip_address(value)
    except ValueError:
        raise invalid(field, f"{value!r} is not an IPv{family} address") from None
    if parsed.version != family:
        raise invalid(field, f"{value!r} is not an IPv{family} address")
    return parsed


def _unusable(address: ipaddress.IPv4Address | ipaddress.IPv6Address, *, gateway: bool) -> str:
    """Why no interface may have this address ("" if it may). Loopback and link-local addresses
    (169.254.169.254 is the cloud metadata address) belong to the host; 240.0.0.0/4 holds the
    limited broadcast. A v6 gateway may be link-local (routers advertise fe80:: addresses)."""
    if address.is_multicast or address.is_unspecified:
        return "not a unicast address"
    if address.is_loopback:
        return "a loopback address"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return "an IPv4-mapped address"
    if address.is_link_local and not (gateway and address.version == 6):
        return "a link-local address"
    if isinstance(address, ipaddress.IPv4Address) and (address.is_reserved or address in _THIS_NETWORK):
        return "a reserved or broadcast address"
    return ""


def _check_console(console: ConsoleConfig) -> None:
    if console.type and console.type not in CONSOLE_TYPES:
        raise invalid("config.console.type", "must be SERIAL or VIRTIO_CONSOLE")
    name = console.output_file
    if name and not (_CONSOLE_FILE.fullmatch(name) and name not in RESERVED_LOG_NAMES):
        raise invalid(
            "config.console.output_file",
            "must be a plain file name ending in .log (not "
            + ", ".join(sorted(RESERVED_LOG_NAMES))
            + "); the log is kept in the VM's own directory",
        )


def validate_metadata(metadata: dict[str, str], limits: Limits, field: str = "config.metadata") -> None:
    if len(metadata) > limits.max_metadata_entries:
        raise invalid(field, f"at most {limits.max_metadata_entries} entries")
    for key, value in metadata.items():
        if not key or len(key) > MAX_METADATA_KEY_LENGTH:
            raise invalid(field, f"keys must be 1-{MAX_METADATA_KEY_LENGTH} characters")
        if len(value) > MAX_METADATA_VALUE_LENGTH:
            raise invalid(f"{field}[{key[:32]}]", f"value longer than {MAX_METADATA_VALUE_LENGTH}")
