"""LaunchSpec -> QEMU argv: disks, kernel arguments, consoles, NICs, accelerators, CPU templates,
and the wrappers that sandbox it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from metald.backends.qemu.cmdline import (
    CPU_TEMPLATES,
    DiskFds,
    HostOptions,
    VmmFds,
    cpu_model,
    kernel_args,
    name_matches,
    qemu_argv,
)
from metald.backends.vmm.sandbox import VmmUser, wrap_argv
from metald.ports import DiskSpec, LaunchSpec, NicSpec
from tests.support.specs import bare_spec

TCG = HostOptions(binary="qemu-system-x86_64", accel="tcg", tsc_khz=2596134)
KVM = HostOptions(binary="qemu-system-x86_64", accel="kvm", tsc_khz=2596134)
VM_DIR = Path("/var/lib/metald/vms/vm_1")


def make_spec(**changes: object) -> LaunchSpec:
    disks = (DiskSpec("root", Path("/assets/rootfs.ext4"), read_only=False, is_root=True),)
    spec = bare_spec(
        "vm_1",
        VM_DIR,
        Path("/assets/vmlinux"),
        disks,
        vcpu_count=2,
        memory_bytes=512 * 1024 * 1024,
        initrd=Path("/assets/initrd"),
        customer_kernel_args="console=ttyS0 reboot=k panic=1",
        guest_kernel_args="metald.vm_id=vm_1",
    )
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


def fds_for(spec: LaunchSpec) -> VmmFds:
    """Descriptor numbers as files.py would hand them over: 10+ for disks, in launch order."""
    disks = sorted(spec.disks, key=lambda d: not d.is_root)
    return VmmFds(
        kernel=3,
        initrd=None if spec.initrd is None else 4,
        disks=tuple(
            DiskFds((10 + 3 * i,)) if d.read_only else DiskFds((10 + 3 * i, 11 + 3 * i), 12 + 3 * i)
            for i, d in enumerate(disks)
        ),
        console=5,
        serial=6 if spec.console_type == "VIRTIO_CONSOLE" else None,
        qmp=7,
        agent=8,
        taps=tuple(range(40, 40 + len(spec.nics))),
    )


def argv_of(spec: LaunchSpec, host: HostOptions) -> list[str]:
    return qemu_argv(spec, host, fds_for(spec))


def values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_machine_memory_smp_kernel_and_fixed_devices() -> None:
    argv = argv_of(make_spec(), TCG)
    assert argv[:3] == ["qemu-system-x86_64", "-name", "vm_1,debug-threads=on"]
    assert values(argv, "-M") == [
        "microvm,acpi=on,x-option-roms=off,isa-serial=on,rtc=on,pit=on,pic=on,pcie=off"
    ]
    assert values(argv, "-m") == ["512"]
    assert values(argv, "-smp") == ["2"]
    assert values(argv, "-kernel") == ["/proc/self/fd/3"]
    assert values(argv, "-initrd") == ["/proc/self/fd/4"]
    assert {"-nodefaults", "-no-user-config"} <= set(argv)
    assert "i8042" in values(argv, "-device")
    assert "socket,id=qmp,fd=7,server=on,wait=off" in values(argv, "-chardev")
    assert values(argv, "-mon") == ["chardev=qmp,mode=control"]
    assert values(argv, "-sandbox")[0].startswith("on,obsolete=deny")
    assert "user" not in " ".join(values(argv, "-netdev"))


def test_memory_rounds_up_to_whole_mib() -> None:
    assert values(argv_of(make_spec(memory_bytes=128 * 1024 * 1024 + 1), TCG), "-m") == ["129"]


def test_initrd_absent() -> None:
    assert "-initrd" not in argv_of(make_spec(initrd=None), TCG)


def test_tcg_gets_tsc_rate_and_default_cpu_kvm_gets_host() -> None:
    tcg = argv_of(make_spec(), TCG)
    assert values(tcg, "-accel") == ["tcg"]
    assert "-cpu" not in tcg
    assert "tsc_early_khz=2596134" in values(tcg, "-append")[0].split()
    kvm = argv_of(make_spec(), KVM)
    assert values(kvm, "-accel") == ["kvm"]
    assert values(kvm, "-cpu") == ["host"]
    assert "tsc_early_khz" not in values(kvm, "-append")[0]


@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_templates_map_to_x86_models(accel: str) -> None:
    host = TCG if accel == "tcg" else KVM
    assert values(argv_of(make_spec(cpu_template="T2A"), host), "-cpu") == ["EPYC-Milan"]
    assert cpu_model("T2CL", accel) == "Cascadelake-Server-noTSX"
    assert set(CPU_TEMPLATES) == {"T2", "T2S", "T2CL", "T2A"}  # V1N1 is ARM: refused
    with pytest.raises(KeyError):
        cpu_model("V1N1", accel)


def test_disks_root_first_read_only_raw_writable_overlay_over_its_base() -> None:
    data = DiskSpec("data", Path("/assets/data.ext4"), read_only=True, is_root=False)
    scratch = DiskSpec("scratch", Path("/assets/scratch.img"), read_only=False, is_root=False)
    root = DiskSpec("root", Path("/assets/rootfs.ext4"), read_only=False, is_root=True)
    argv = argv_of(make_spec(disks=(data, root, scratch)), TCG)
    overlay = (
        "file.locking=off,format=qcow2,discard=unmap,backing.driver=raw,backing.file.filename=/dev/fdset"
    )
    assert values(argv, "-drive") == [
        f"id=disk0,if=none,file=/dev/fdset/10,{overlay}/12",
        "id=disk1,if=none,file=/dev/fdset/13,format=raw,readonly=on",
        f"id=disk2,if=none,file=/dev/fdset/16,{overlay}/18",
    ]
    # Each fd set holds what QEMU opens by its path: the overlay read-write and read-only.
    assert {"fd=10,set=10", "fd=11,set=10", "fd=12,set=12", "fd=13,set=13"} <= set(values(argv, "-add-fd"))
    blk = [d for d in values(argv, "-device") if d.startswith("virtio-blk-device")]
    assert blk == [f"virtio-blk-device,drive=disk{i},id=blk{i}" for i in range(3)]


def test_qemu_opens_no_host_path_itself() -> None:
    """Every file QEMU uses is a descriptor: no directory it cannot enter stands in its way."""
    spec = make_spec(console_type="VIRTIO_CONSOLE", vm_dir=Path("/" + "x" * 200))
    fds = fds_for(spec)
    argv = qemu_argv(spec, TCG, fds)
    text = " ".join(argv[1:])
    assert "/assets/" not in text and str(spec.vm_dir) not in text and ".sock" not in text
    add_fd = {int(v.split(",")[0].removeprefix("fd=")) for v in values(argv, "-add-fd")}
    sockets = {int(c.split("fd=")[1].split(",")[0]) for c in values(argv, "-chardev") if "fd=" in c}
    assert add_fd | sockets | {3, 4} == set(fds.all())


def test_root_args_added_only_when_customer_gave_none() -> None:
    assert kernel_args(make_spec(), TCG).split()[3:6] == ["root=/dev/vda", "rw", "tsc_early_khz=2596134"]
    ro_root = (DiskSpec("root", Path("/r"), read_only=True, is_root=True),)
    assert "ro" in kernel_args(make_spec(disks=ro_root), TCG).split()
    custom = kernel_args(make_spec(customer_kernel_args="root=/dev/vdb ro"), TCG).split()
    assert "root=/dev/vda" not in custom and "rw" not in custom
    assert "root=" not in kernel_args(make_spec(disks=()), TCG)


def test_kernel_args_customer_first_metald_last() -> None:
    args = kernel_args(make_spec(guest_kernel_args="metald.vm_id=vm_1 metald.nic=aa:bb"), TCG).split()
    assert args[:3] == ["console=ttyS0", "reboot=k", "panic=1"]
    assert args[-2:] == ["metald.vm_id=vm_1", "metald.nic=aa:bb"]
    assert args.count("console=ttyS0") == 1


def test_serial_console_goes_to_console_path() -> None:
    argv = argv_of(make_spec(customer_kernel_args=""), TCG)
    assert values(argv, "-chardev")[0] == "file,id=serial,path=/dev/fdset/5,append=on"
    assert "fd=5,set=5" in values(argv, "-add-fd")
    assert values(argv, "-serial") == ["chardev:serial"]
    assert not any(d.startswith("virtconsole") for d in values(argv, "-device"))
    assert "console=ttyS0" in values(argv, "-append")[0].split()


def test_virtio_console_goes_to_console_path_and_serial_to_vm_dir() -> None:
    argv = argv_of(make_spec(console_type="VIRTIO_CONSOLE", customer_kernel_args=""), TCG)
    chardevs = values(argv, "-chardev")
    assert "file,id=serial,path=/dev/fdset/6,append=on" in chardevs
    assert "file,id=console,path=/dev/fdset/5,append=on" in chardevs
    devices = values(argv, "-device")
    assert devices.count("virtio-serial-device") == 1
    assert "virtconsole,chardev=console" in devices
    assert "virtserialport,chardev=agent,name=org.metald.agent" in devices
    assert values(argv, "-append")[0].split()[:2] == ["console=ttyS0", "console=hvc0"]


def test_agent_and_qmp_are_listening_sockets_handed_over() -> None:
    chardevs = values(argv_of(make_spec(), TCG), "-chardev")
    assert "socket,id=agent,fd=8,server=on,wait=off" in chardevs
    assert "socket,id=qmp,fd=7,server=on,wait=off" in chardevs


def test_nics_are_virtio_net_on_taps_without_vhost() -> None:
    nics = (NicSpec("eth0", "tap0", "02:00:00:00:00:01"), NicSpec("eth1", "tap1", "02:00:00:00:00:02"))
    argv = argv_of(make_spec(nics=nics, netns="metald-vm_1"), TCG)
    assert values(argv, "-netdev") == [f"tap,id=net{i},fd={40 + i},vhost=off" for i in range(2)]
    net = [d for d in values(argv, "-device") if d.startswith("virtio-net-device")]
    assert net == [
        "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01,id=nic0",
        "virtio-net-device,netdev=net1,mac=02:00:00:00:00:02,id=nic1",
    ]


def test_wrap_argv_netns_and_user() -> None:
    argv = ["qemu-system-x86_64", "-name", "vm_1,debug-threads=on"]
    assert wrap_argv(argv, netns=None, user=None) == argv
    assert wrap_argv(argv, netns="ns1", user=None) == ["ip", "netns", "exec", "ns1", *argv]
    assert wrap_argv(argv, netns="ns1", user=VmmUser(1000, 1001)) == [
        "ip", "netns", "exec", "ns1",
        "setpriv", "--reuid=1000", "--regid=1001", "--clear-groups", "--no-new-privs",
        "--pdeathsig=KILL", "--",
        *argv,
    ]  # fmt: skip
    kvm = VmmUser(1000, 1001).with_group(108)
    assert "--groups=108" in wrap_argv(argv, netns=None, user=kvm)
    assert kvm.with_group(108) == kvm and kvm.with_group(None) == kvm
    assert wrap_argv(argv, netns=None, user=None, pdeathsig=True) == [
        "setpriv",
        "--pdeathsig=KILL",
        "--",
        *argv,
    ]


def test_name_matches_only_that_vm() -> None:
    argv = argv_of(make_spec(), TCG)
    assert name_matches(argv, "vm_1")
    assert not name_matches(argv, "vm_10")
    assert not name_matches(["sleep", "100"], "vm_1")


def test_ram_file_shared_for_a_vm_of_its_own_private_for_a_clone() -> None:
    own = qemu_argv(make_spec(), TCG, dataclasses.replace(fds_for(make_spec()), ram=40))
    assert values(own, "-object") == [
        "memory-backend-file,id=mem,size=512M,mem-path=/proc/self/fd/40,share=on"
    ]
    assert "memory-backend=mem" in values(own, "-machine") and "-incoming" not in own
    clone = qemu_argv(make_spec(), TCG, dataclasses.replace(fds_for(make_spec()), ram=40, incoming=41))
    assert values(clone, "-object") == [
        "memory-backend-file,id=mem,size=512M,mem-path=/proc/self/fd/40,share=off"
    ]
    assert values(clone, "-incoming") == ["defer"]
    assert 40 in dataclasses.replace(fds_for(make_spec()), ram=40, incoming=41).all()


def test_a_clone_disk_chains_its_overlay_over_the_frozen_ones_and_the_base() -> None:
    fds = fds_for(make_spec())
    root = dataclasses.replace(fds.disks[0], frozen=(50, 51))
    argv = qemu_argv(make_spec(), TCG, dataclasses.replace(fds, disks=(root, *fds.disks[1:])))
    drive = values(argv, "-drive")[0]
    assert (
        "backing.driver=qcow2,backing.file.filename=/dev/fdset/50,"
        "backing.backing.driver=qcow2,backing.backing.file.filename=/dev/fdset/51,"
        "backing.backing.backing.driver=raw,backing.backing.backing.file.filename=/dev/fdset/12"
    ) in drive
    assert "fd=50,set=50" in argv and "fd=51,set=51" in argv


def test_tcg_guests_trust_the_tsc_unless_the_customer_says_otherwise() -> None:
    assert "tsc=reliable" in kernel_args(make_spec(), TCG).split()
    assert "tsc=reliable" not in kernel_args(make_spec(), KVM).split()
    custom = kernel_args(make_spec(customer_kernel_args="tsc=unstable"), TCG).split()
    assert "tsc=unstable" in custom and "tsc=reliable" not in custom
