"""LaunchSpec -> QEMU microvm argv. Pure functions: no I/O, everything the host decides is an argument.

CPU templates. The reference API takes Firecracker's templates; each maps to the closest documented
QEMU x86 model:

- T2   (Intel Skylake/Cascade Lake, T2 instance mask)      -> Skylake-Client-noTSX-IBRS
- T2S  (T2 made safe to migrate between Skylake and Cascade Lake) -> Skylake-Server-noTSX-IBRS
- T2CL (Intel Cascade Lake)                                 -> Cascadelake-Server-noTSX
- T2A  (AMD Milan)                                          -> EPYC-Milan
- V1N1 (ARM Neoverse V1) has no x86 equivalent: not offered, so the service refuses it.

Under KVM the model's CPUID is what the guest sees (QEMU drops features the host lacks). Under TCG
the same model is used: QEMU 7.2 filters the features TCG cannot emulate (PCID, x2APIC, TSC deadline,
INVPCID, RDSEED, ...) with a warning in vmm.log, and the guest still boots with the model's
vendor/family/model and the remaining features (measured: all four boot the default guest, ready in
~3.5 s vs ~3.1 s for qemu64). Without a template the guest gets `host` under KVM and QEMU's default
(qemu64) under TCG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from metald.backends.qemu import layout
from metald.ports import DiskSpec, LaunchSpec

MIB = 1024 * 1024

CPU_TEMPLATES: dict[str, str] = {
    "T2": "Skylake-Client-noTSX-IBRS",
    "T2S": "Skylake-Server-noTSX-IBRS",
    "T2CL": "Cascadelake-Server-noTSX",
    "T2A": "EPYC-Milan",
}
TCG_DEFAULT_CPU = "qemu64"

_MACHINE = "microvm,acpi=on,x-option-roms=off,isa-serial=on,rtc=on,pit=on,pic=on,pcie=off"
_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class HostOptions:
    """What the host decided for one launch (not part of the VM's config)."""

    binary: str
    accel: str  # "kvm" or "tcg"
    tsc_khz: int = 0  # host TSC rate, passed to TCG guests (else ~1 boot in 7 hangs calibrating)
    sandbox: bool = True


def cpu_model(template: str, accel: str) -> str:
    """The QEMU -cpu model for a template ("" = none); KeyError for a template not offered."""
    if template:
        return CPU_TEMPLATES[template]
    return "host" if accel == "kvm" else TCG_DEFAULT_CPU


def ordered_disks(disks: Sequence[DiskSpec]) -> list[DiskSpec]:
    """Launch order: the root device first (it becomes /dev/vda), the rest as given."""
    return sorted(disks, key=lambda d: not d.is_root)


def _has_arg(args: Sequence[str], key: str) -> bool:
    return any(a == key or a.startswith(key + "=") for a in args)


def kernel_args(spec: LaunchSpec, host: HostOptions) -> str:
    """The customer's arguments first, then what metald needs, without overriding the customer."""
    customer = spec.customer_kernel_args.split()
    ours: list[str] = []
    if not _has_arg(customer, "console"):
        # With the virtio console, the serial port (serial.log) still gets the early boot messages
        # that come before the virtio_console module loads; the last console= is /dev/console.
        ours.append("console=ttyS0")
        if spec.console_type == "VIRTIO_CONSOLE":
            ours.append("console=hvc0")
    root = next((d for d in spec.disks if d.is_root), None)
    if root is not None and not _has_arg(customer, "root"):
        ours += ["root=/dev/vda", "ro" if root.read_only else "rw"]
    if host.accel == "tcg" and host.tsc_khz > 0 and not _has_arg(customer, "tsc_early_khz"):
        ours.append(f"tsc_early_khz={host.tsc_khz}")
    return " ".join([*customer, *ours, *spec.guest_kernel_args.split()])


def _opt(value: object) -> str:
    """Escape a value inside a QEMU option string (a comma is written as two)."""
    return str(value).replace(",", ",,")


def _disk_args(spec: LaunchSpec) -> list[str]:
    args: list[str] = []
    for i, disk in enumerate(ordered_disks(spec.disks)):
        if disk.read_only:
            drive = f"file={_opt(disk.host_path)},format=raw,readonly=on"
        else:
            drive = f"file={_opt(layout.overlay_path(spec.vm_dir, i))},format=qcow2,discard=unmap"
        args += [
            "-drive",
            f"id=disk{i},if=none,{drive}",
            "-device",
            f"virtio-blk-device,drive=disk{i},id=blk{i}",
        ]
    return args


def _nic_args(spec: LaunchSpec) -> list[str]:
    args: list[str] = []
    for i, nic in enumerate(spec.nics):
        args += [
            "-netdev",
            f"tap,id=net{i},ifname={_opt(nic.tap_device)},script=no,downscript=no,vhost=off",
            "-device",
            f"virtio-net-device,netdev=net{i},mac={nic.mac},id=nic{i}",
        ]
    return args


def _file_chardev(chardev_id: str, path: object) -> list[str]:
    return ["-chardev", f"file,id={chardev_id},path={_opt(path)},append=on"]


def _console_args(spec: LaunchSpec) -> list[str]:
    """Serial console, plus one virtio-serial device carrying the virtio console and the agent port."""
    if spec.console_type == "VIRTIO_CONSOLE":
        serial = _file_chardev("serial", layout.SERIAL_LOG)
        virtconsole = [*_file_chardev("console", spec.console_path), "-device", "virtconsole,chardev=console"]
    else:
        serial = _file_chardev("serial", spec.console_path)
        virtconsole = []
    return [
        *serial,
        "-serial",
        "chardev:serial",
        "-device",
        "virtio-serial-device",
        *virtconsole,
        "-chardev",
        f"socket,id=agent,path={layout.AGENT_SOCKET},server=on,wait=off",
        "-device",
        f"virtserialport,chardev=agent,name={layout.AGENT_PORT}",
    ]


def qemu_argv(spec: LaunchSpec, host: HostOptions) -> list[str]:
    """The QEMU command for one VM; socket and log paths are relative to vm_dir (QEMU's cwd)."""
    model = cpu_model(spec.cpu_template, host.accel)
    argv = [
        host.binary,
        "-name",
        f"{spec.vm_id},debug-threads=on",
        "-M",
        _MACHINE,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-vga",
        "none",
        "-accel",
        host.accel,
    ]
    if model != TCG_DEFAULT_CPU:
        argv += ["-cpu", model]
    if host.sandbox:
        argv += ["-sandbox", _SANDBOX]
    argv += [
        "-m",
        str(-(-spec.memory_bytes // MIB)),
        "-smp",
        str(spec.vcpu_count),
        "-kernel",
        str(spec.kernel),
    ]
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    argv += ["-append", kernel_args(spec, host)]
    argv += _disk_args(spec)
    argv += _nic_args(spec)
    argv += _console_args(spec)
    argv += ["-device", "i8042", "-qmp", f"unix:{layout.QMP_SOCKET},server=on,wait=off"]
    return argv


def wrap_argv(argv: Sequence[str], *, netns: str | None, uid: int | None, gid: int | None) -> list[str]:
    """Run `argv` inside network namespace `netns` and/or as uid/gid; each wrapper execs, keeping the pid.

    setpriv re-arms the parent-death signal because changing credentials clears it.
    """
    out: list[str] = []
    if netns:
        out += ["ip", "netns", "exec", netns]
    if uid is not None or gid is not None:
        out.append("setpriv")
        if uid is not None:
            out.append(f"--reuid={uid}")
        if gid is not None:
            out += [f"--regid={gid}", "--clear-groups"]
        out += ["--pdeathsig=KILL", "--"]
    return out + list(argv)


def name_matches(cmdline: Sequence[str], vm_id: str) -> bool:
    """Whether a process command line is the QEMU of `vm_id` (checked before re-adopting a pid)."""
    return f"{vm_id},debug-threads=on" in cmdline
