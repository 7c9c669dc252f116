"""LaunchSpec -> QEMU argv: disks, kernel arguments, consoles, NICs, accelerators, CPU templates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from metald.backends.qemu.cmdline import (
    CPU_TEMPLATES,
    HostOptions,
    cpu_model,
    kernel_args,
    name_matches,
    qemu_argv,
    wrap_argv,
)
from metald.ports import DiskSpec, LaunchSpec, NicSpec

TCG = HostOptions(binary="qemu-system-x86_64", accel="tcg", tsc_khz=2596134)
KVM = HostOptions(binary="qemu-system-x86_64", accel="kvm", tsc_khz=2596134)
VM_DIR = Path("/var/lib/metald/vms/vm_1")


def make_spec(**changes: object) -> LaunchSpec:
    spec = LaunchSpec(
        vm_id="vm_1",
        vm_dir=VM_DIR,
        vcpu_count=2,
        memory_bytes=512 * 1024 * 1024,
        cpu_template="",
        kernel=Path("/assets/vmlinux"),
        initrd=Path("/assets/initrd"),
        customer_kernel_args="console=ttyS0 reboot=k panic=1",
        guest_kernel_args="metald.vm_id=vm_1",
        disks=(DiskSpec("root", Path("/assets/rootfs.ext4"), read_only=False, is_root=True),),
        nics=(),
        netns=None,
        console_type="SERIAL",
        console_path=VM_DIR / "console.log",
    )
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


def values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_machine_memory_smp_kernel_and_fixed_devices() -> None:
    argv = qemu_argv(make_spec(), TCG)
    assert argv[:3] == ["qemu-system-x86_64", "-name", "vm_1,debug-threads=on"]
    assert values(argv, "-M") == [
        "microvm,acpi=on,x-option-roms=off,isa-serial=on,rtc=on,pit=on,pic=on,pcie=off"
    ]
    assert values(argv, "-m") == ["512"]
    assert values(argv, "-smp") == ["2"]
    assert values(argv, "-kernel") == ["/assets/vmlinux"]
    assert values(argv, "-initrd") == ["/assets/initrd"]
    assert {"-nodefaults", "-no-user-config"} <= set(argv)
    assert "i8042" in values(argv, "-device")
    assert values(argv, "-qmp") == ["unix:qmp.sock,server=on,wait=off"]
    assert values(argv, "-sandbox")[0].startswith("on,obsolete=deny")
    assert "user" not in " ".join(values(argv, "-netdev"))


def test_memory_rounds_up_to_whole_mib() -> None:
    assert values(qemu_argv(make_spec(memory_bytes=128 * 1024 * 1024 + 1), TCG), "-m") == ["129"]


def test_initrd_absent() -> None:
    assert "-initrd" not in qemu_argv(make_spec(initrd=None), TCG)


def test_tcg_gets_tsc_rate_and_default_cpu_kvm_gets_host() -> None:
    tcg = qemu_argv(make_spec(), TCG)
    assert values(tcg, "-accel") == ["tcg"]
    assert "-cpu" not in tcg
    assert "tsc_early_khz=2596134" in values(tcg, "-append")[0].split()
    kvm = qemu_argv(make_spec(), KVM)
    assert values(kvm, "-accel") == ["kvm"]
    assert values(kvm, "-cpu") == ["host"]
    assert "tsc_early_khz" not in values(kvm, "-append")[0]


@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_templates_map_to_x86_models(accel: str) -> None:
    host = TCG if accel == "tcg" else KVM
    assert values(qemu_argv(make_spec(cpu_template="T2A"), host), "-cpu") == ["EPYC-Milan"]
    assert cpu_model("T2CL", accel) == "Cascadelake-Server-noTSX"
    assert set(CPU_TEMPLATES) == {"T2", "T2S", "T2CL", "T2A"}  # V1N1 is ARM: refused
    with pytest.raises(KeyError):
        cpu_model("V1N1", accel)


def test_disks_root_first_read_only_raw_writable_overlay() -> None:
    data = DiskSpec("data", Path("/assets/data.ext4"), read_only=True, is_root=False)
    scratch = DiskSpec("scratch", Path("/assets/scratch.img"), read_only=False, is_root=False)
    root = DiskSpec("root", Path("/assets/rootfs.ext4"), read_only=False, is_root=True)
    argv = qemu_argv(make_spec(disks=(data, root, scratch)), TCG)
    assert values(argv, "-drive") == [
        f"id=disk0,if=none,file={VM_DIR}/disk0.qcow2,format=qcow2,discard=unmap",
        "id=disk1,if=none,file=/assets/data.ext4,format=raw,readonly=on",
        f"id=disk2,if=none,file={VM_DIR}/disk2.qcow2,format=qcow2,discard=unmap",
    ]
    blk = [d for d in values(argv, "-device") if d.startswith("virtio-blk-device")]
    assert blk == [f"virtio-blk-device,drive=disk{i},id=blk{i}" for i in range(3)]


def test_commas_in_paths_are_escaped() -> None:
    disk = DiskSpec("root", Path("/a,b/root.img"), read_only=True, is_root=True)
    argv = qemu_argv(make_spec(disks=(disk,), console_path=Path("/x,y/console.log")), TCG)
    assert "file=/a,,b/root.img" in values(argv, "-drive")[0]
    assert "path=/x,,y/console.log" in values(argv, "-chardev")[0]


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
    argv = qemu_argv(make_spec(customer_kernel_args=""), TCG)
    assert values(argv, "-chardev")[0] == f"file,id=serial,path={VM_DIR}/console.log,append=on"
    assert values(argv, "-serial") == ["chardev:serial"]
    assert not any(d.startswith("virtconsole") for d in values(argv, "-device"))
    assert "console=ttyS0" in values(argv, "-append")[0].split()


def test_virtio_console_goes_to_console_path_and_serial_to_vm_dir() -> None:
    argv = qemu_argv(make_spec(console_type="VIRTIO_CONSOLE", customer_kernel_args=""), TCG)
    chardevs = values(argv, "-chardev")
    assert "file,id=serial,path=serial.log,append=on" in chardevs
    assert f"file,id=console,path={VM_DIR}/console.log,append=on" in chardevs
    devices = values(argv, "-device")
    assert devices.count("virtio-serial-device") == 1
    assert "virtconsole,chardev=console" in devices
    assert "virtserialport,chardev=agent,name=org.metald.agent" in devices
    assert values(argv, "-append")[0].split()[:2] == ["console=ttyS0", "console=hvc0"]


def test_agent_and_qmp_sockets_are_relative_to_vm_dir() -> None:
    argv = qemu_argv(make_spec(vm_dir=Path("/" + "x" * 200)), TCG)
    assert "socket,id=agent,path=agent.sock,server=on,wait=off" in values(argv, "-chardev")
    assert values(argv, "-qmp") == ["unix:qmp.sock,server=on,wait=off"]


def test_nics_are_virtio_net_on_taps_without_vhost() -> None:
    nics = (NicSpec("eth0", "tap0", "02:00:00:00:00:01"), NicSpec("eth1", "tap1", "02:00:00:00:00:02"))
    argv = qemu_argv(make_spec(nics=nics, netns="metald-vm_1"), TCG)
    assert values(argv, "-netdev") == [
        f"tap,id=net{i},ifname=tap{i},script=no,downscript=no,vhost=off" for i in range(2)
    ]
    net = [d for d in values(argv, "-device") if d.startswith("virtio-net-device")]
    assert net == [
        "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01,id=nic0",
        "virtio-net-device,netdev=net1,mac=02:00:00:00:00:02,id=nic1",
    ]


def test_wrap_argv_netns_and_uid() -> None:
    argv = ["qemu-system-x86_64", "-name", "vm_1,debug-threads=on"]
    assert wrap_argv(argv, netns=None, uid=None, gid=None) == argv
    assert wrap_argv(argv, netns="ns1", uid=None, gid=None) == ["ip", "netns", "exec", "ns1", *argv]
    assert wrap_argv(argv, netns="ns1", uid=1000, gid=1001, ) == [
        "ip", "netns", "exec", "ns1",
        "setpriv", "--reuid=1000", "--regid=1001", "--clear-groups", "--pdeathsig=KILL", "--",
        *argv,
    ]  # fmt: skip


def test_name_matches_only_that_vm() -> None:
    argv = qemu_argv(make_spec(), TCG)
    assert name_matches(argv, "vm_1")
    assert not name_matches(argv, "vm_10")
    assert not name_matches(["sleep", "100"], "vm_1")
