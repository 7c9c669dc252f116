"""LaunchSpec -> QEMU microvm argv. Pure functions: no I/O, everything the host decides is an argument.

QEMU is given no host path it would open itself but /proc/self/fd/N: every file, socket and TAP is
a descriptor the daemon opened (files.py, VmmFds here), disks and logs through `-add-fd` fd sets
(`/dev/fdset/N`, N = the set's first descriptor), sockets and TAPs as descriptors (`fd=N`).

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
from metald.ports import LaunchSpec

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


@dataclass(frozen=True)
class DiskFds:
    """One disk: a read-only image, or a writable overlay (read-write and read-only descriptors:
    QEMU probes the format read-only) with the base image it was made over."""

    image: tuple[int, ...]
    base: int | None = None
    frozen: tuple[int, ...] = ()  # a clone's: the snapshots' frozen overlays between image and base


@dataclass(frozen=True)
class VmmFds:
    """The descriptors QEMU inherits for one VM (numbers as QEMU sees them)."""

    kernel: int
    initrd: int | None
    disks: tuple[DiskFds, ...]  # in launch order (spec.disks)
    console: int
    serial: int | None  # serial.log, when the console is the virtio console
    qmp: int  # listening sockets
    agent: int
    taps: tuple[int, ...] = ()  # one per NIC, in order
    ram: int | None = None  # the guest RAM's file (snapshot.py); None: anonymous memory
    incoming: int | None = None  # a clone's device state to load (snapshot.py)
    # Reading ends of the console (and serial) pipes, for the supervisor's bounded logs: never QEMU's.
    log_sources: tuple[int, ...] = ()

    def all(self) -> list[int]:
        disks = [fd for d in self.disks for fd in (*d.image, *d.frozen, d.base) if fd is not None]
        optional = [fd for fd in (self.initrd, self.serial, self.ram, self.incoming) if fd is not None]
        return [self.kernel, *disks, self.console, *optional, self.qmp, self.agent, *self.taps]


def cpu_model(template: str, accel: str) -> str:
    """The QEMU -cpu model for a template ("" = none); KeyError for a template not offered."""
    if template:
        return CPU_TEMPLATES[template]
    return "host" if accel == "kvm" else TCG_DEFAULT_CPU


def launch_cpu_model(spec: LaunchSpec, accel: str) -> str:
    """The -cpu model of this launch: the one the service decided (spec.cpu_model), else the
    template's; "" becomes the accelerator's default."""
    if spec.cpu_model is None:
        return cpu_model(spec.cpu_template, accel)
    return spec.cpu_model or cpu_model("", accel)


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
    if host.accel == "tcg" and not _has_arg(customer, "tsc"):
        # TCG's TSC is the host's, but a loaded host delays vCPUs: the guest's clocksource watchdog
        # would mark it unstable and fall back to a slower clock that runs 1.5-6 % slow.
        ours.append("tsc=reliable")
    return " ".join([*customer, *ours, *spec.guest_kernel_args.split()])


def _fdset(fds: Sequence[int]) -> tuple[list[str], str]:
    """`-add-fd` arguments putting `fds` in one fd set, and the path QEMU opens that set by."""
    add = [arg for fd in fds for arg in ("-add-fd", f"fd={fd},set={fds[0]}")]
    return add, f"/dev/fdset/{fds[0]}"


def _disk_args(spec: LaunchSpec, fds: VmmFds) -> list[str]:
    args: list[str] = []
    for i, (disk, files) in enumerate(zip(spec.disks, fds.disks, strict=True)):
        add, image = _fdset(files.image)
        if disk.read_only:
            drive = f"file={image},format=raw,readonly=on"
        else:
            assert files.base is not None, "a writable disk is an overlay over a base"
            add_base, base = _fdset((files.base,))
            add += add_base
            chain = ""
            for depth, fd in enumerate(files.frozen):  # clone -> frozen snapshot overlays -> raw base
                add_frozen, frozen = _fdset((fd,))
                add += add_frozen
                chain += (
                    "backing." * (depth + 1)
                    + f"driver=qcow2,{'backing.' * (depth + 1)}file.filename={frozen},"
                )
            level = "backing." * (len(files.frozen) + 1)
            # No image locks: the overlay is this VM's alone, and QEMU's own locks on its two
            # descriptors of it conflict when a snapshot re-activates the disk after the save.
            drive = (
                f"file={image},file.locking=off,format=qcow2,discard=unmap,"
                f"{chain}{level}driver=raw,{level}file.filename={base}"
            )
        args += [
            *add,
            *_backed("-drive", f"id=disk{i},if=none,{drive}", f"virtio-blk-device,drive=disk{i},id=blk{i}"),
        ]
    return args


def _nic_args(spec: LaunchSpec, fds: VmmFds) -> list[str]:
    args: list[str] = []
    for i, (nic, tap) in enumerate(zip(spec.nics, fds.taps, strict=True)):
        args += _backed(
            "-netdev",
            f"tap,id=net{i},fd={tap},vhost=off",
            f"virtio-net-device,netdev=net{i},mac={nic.mac},id=nic{i}",
        )
    return args


def _backed(option: str, backend: str, device: str) -> list[str]:
    """A host-side backend (`-drive`, `-netdev`) and the guest's virtio-mmio device on it."""
    return [option, backend, "-device", device]


def _file_chardev(chardev_id: str, fd: int) -> list[str]:
    add, path = _fdset((fd,))
    return [*add, "-chardev", f"file,id={chardev_id},path={path},append=on"]


def _socket_chardev(chardev_id: str, fd: int) -> list[str]:
    return ["-chardev", f"socket,id={chardev_id},fd={fd},server=on,wait=off"]


def _console_args(spec: LaunchSpec, fds: VmmFds) -> list[str]:
    """Serial console, plus one virtio-serial device carrying the virtio console and the agent port."""
    if spec.console_type == "VIRTIO_CONSOLE":
        assert fds.serial is not None
        serial = _file_chardev("serial", fds.serial)
        virtconsole = [*_file_chardev("console", fds.console), "-device", "virtconsole,chardev=console"]
    else:
        serial = _file_chardev("serial", fds.console)
        virtconsole = []
    return [
        *serial,
        "-serial",
        "chardev:serial",
        "-device",
        "virtio-serial-device",
        *virtconsole,
        *_socket_chardev("agent", fds.agent),
        "-device",
        f"virtserialport,chardev=agent,name={layout.AGENT_PORT}",
    ]


def _memory_args(spec: LaunchSpec, fds: VmmFds) -> list[str]:
    """RAM in a file: shared for a VM of its own (so a snapshot needs no RAM stream), private
    copy-on-write over the snapshot's RAM for a clone; a clone then waits for its device state."""
    mib = -(-spec.memory_bytes // MIB)
    args = ["-m", str(mib)]
    if fds.ram is not None:
        share = "off" if fds.incoming is not None else "on"
        args += [
            "-object",
            f"memory-backend-file,id=mem,size={mib}M,mem-path=/proc/self/fd/{fds.ram},share={share}",
            "-machine",
            "memory-backend=mem",
        ]
    if fds.incoming is not None:
        args += ["-incoming", "defer"]
    return args


def qemu_argv(spec: LaunchSpec, host: HostOptions, fds: VmmFds) -> list[str]:
    """The QEMU command for one VM, whose files are the descriptors `fds`."""
    model = launch_cpu_model(spec, host.accel)
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
        *_memory_args(spec, fds),
        "-smp",
        str(spec.vcpu_count),
        "-kernel",
        f"/proc/self/fd/{fds.kernel}",
    ]
    if fds.initrd is not None:
        argv += ["-initrd", f"/proc/self/fd/{fds.initrd}"]
    argv += ["-append", kernel_args(spec, host)]
    argv += _disk_args(spec, fds)
    argv += _nic_args(spec, fds)
    argv += _console_args(spec, fds)
    argv += ["-device", "i8042", *_socket_chardev("qmp", fds.qmp), "-mon", "chardev=qmp,mode=control"]
    return argv


def name_matches(cmdline: Sequence[str], vm_id: str) -> bool:
    """Whether a process command line is the QEMU of `vm_id` (checked before re-adopting a pid)."""
    return f"{vm_id},debug-threads=on" in cmdline
