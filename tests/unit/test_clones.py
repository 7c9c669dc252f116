"""A clone's configuration: the snapshot's machine, the clone's own network, metadata and console."""

from __future__ import annotations

import pytest

from metald.domain.clones import clone_config
from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.model import (
    BootConfig,
    ConsoleConfig,
    CpuConfig,
    MemoryConfig,
    NetworkInterface,
    StorageDevice,
    VmConfig,
)

SNAPSHOT = VmConfig(
    cpu=CpuConfig(2, "T2"),
    memory=MemoryConfig(256 << 20),
    boot=BootConfig("/assets/vmlinux", "quiet", "/assets/initrd"),
    storage=(StorageDevice("root", "/assets/rootfs.ext4", False, True),),
    network=(NetworkInterface("eth0", "TAP", "auto"),),
    console=ConsoleConfig("SERIAL", "console.log"),
    metadata={"role": "template"},
)
NIC = (NetworkInterface("eth0", "TAP", "02:00:00:00:00:09"),)


def _field_of(error: MetaldError) -> str:
    return error.metadata["field"]


def test_a_bare_request_takes_the_machine_and_keeps_its_own_parts() -> None:
    config = clone_config(VmConfig(network=NIC, metadata={"name": "clone"}), SNAPSHOT)
    assert (config.cpu, config.memory, config.boot, config.storage) == (
        SNAPSHOT.cpu,
        SNAPSHOT.memory,
        SNAPSHOT.boot,
        SNAPSHOT.storage,
    )
    assert config.network == NIC and config.metadata == {"name": "clone"}
    assert config.console == SNAPSHOT.console


def test_repeating_the_snapshots_values_is_fine() -> None:
    asked = VmConfig(
        cpu=CpuConfig(2, "T2"), memory=MemoryConfig(256 << 20), storage=SNAPSHOT.storage, network=NIC
    )
    assert clone_config(asked, SNAPSHOT).cpu == SNAPSHOT.cpu


@pytest.mark.parametrize(
    ("asked", "field"),
    [
        (VmConfig(cpu=CpuConfig(4), network=NIC), "config.cpu.vcpu_count"),
        (VmConfig(cpu=CpuConfig(0, "T2A"), network=NIC), "config.cpu.cpu_template"),
        (VmConfig(memory=MemoryConfig(512 << 20), network=NIC), "config.memory.size_bytes"),
        (VmConfig(boot=BootConfig(kernel_args="debug"), network=NIC), "config.boot.kernel_args"),
        (VmConfig(boot=BootConfig(kernel_path="/other"), network=NIC), "config.boot.kernel_path"),
        (VmConfig(storage=(StorageDevice("root", "/x", False, True),), network=NIC), "config.storage"),
        (VmConfig(), "config.network"),
        (VmConfig(network=NIC * 2), "config.network"),
        (VmConfig(network=NIC, console=ConsoleConfig("VIRTIO_CONSOLE")), "config.console.type"),
    ],
)
def test_a_different_machine_is_refused_naming_the_field(asked: VmConfig, field: str) -> None:
    with pytest.raises(MetaldError) as raised:
        clone_config(asked, SNAPSHOT)
    assert raised.value.code is ErrorCode.INVALID_ARGUMENT and _field_of(raised.value) == field


def test_the_console_output_file_is_the_clones_own() -> None:
    config = clone_config(VmConfig(network=NIC, console=ConsoleConfig(output_file="mine.log")), SNAPSHOT)
    assert config.console == ConsoleConfig("SERIAL", "mine.log")
