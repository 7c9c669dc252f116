"""Pure domain logic: state machine, ids, defaults, paging tokens, quotas, config round trips."""

from __future__ import annotations

import dataclasses

import pytest

from metald.domain import ids
from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.guest_args import guest_kernel_args
from metald.domain.model import (
    MIB,
    BootConfig,
    CpuConfig,
    IpConfig,
    MemoryConfig,
    NetworkInterface,
    NicAddress,
    RateLimit,
    StorageDevice,
    VmConfig,
    from_dict,
    to_dict,
)
from metald.domain.paging import PageTokens
from metald.domain.quotas import Quotas, Usage, check_boot, check_create
from metald.domain.states import Operation, VmState, require_allowed
from metald.domain.validation import Defaults, Limits, validate_config, with_defaults

ALLOWED = {
    (Operation.BOOT, VmState.CREATED),
    (Operation.BOOT, VmState.SHUTDOWN),
    (Operation.PAUSE, VmState.RUNNING),
    (Operation.RESUME, VmState.PAUSED),
    (Operation.REBOOT, VmState.RUNNING),
    (Operation.SHUTDOWN, VmState.RUNNING),
    (Operation.SHUTDOWN, VmState.PAUSED),
    (Operation.DELETE, VmState.CREATED),
    (Operation.DELETE, VmState.SHUTDOWN),
}


@pytest.mark.parametrize("op", list(Operation))
@pytest.mark.parametrize("state", [s for s in VmState if s is not VmState.UNSPECIFIED])
def test_state_machine_table(op: Operation, state: VmState) -> None:
    if (op, state) in ALLOWED:
        require_allowed(op, "vm", state)
        return
    with pytest.raises(MetaldError) as caught:
        require_allowed(op, "vm", state)
    assert caught.value.code is ErrorCode.FAILED_PRECONDITION
    assert state.api_name in caught.value.message
    assert caught.value.metadata["current_state"] == state.api_name


def test_forced_delete_is_allowed_from_every_state() -> None:
    for state in VmState:
        require_allowed(Operation.DELETE, "vm", state, force=True)


def test_generated_ids_sort_by_time_and_are_unique() -> None:
    a = ids.new_vm_id(now_ms=1_000)
    b = ids.new_vm_id(now_ms=2_000)
    assert a < b and a.startswith("vm_") and len(a) == 29
    assert len({ids.new_vm_id() for _ in range(1000)}) == 1000
    assert ids.VM_ID_PATTERN.fullmatch(a)


def test_defaults_fill_a_bare_config() -> None:
    config = with_defaults(VmConfig(), Defaults(vcpu_count=1, memory_bytes=256 * MIB))
    assert config.vcpu_count == 1 and config.memory_bytes == 256 * MIB
    assert config.boot == BootConfig(kernel_path="/assets/vmlinux", initrd_path="/assets/initrd")
    assert config.storage == (StorageDevice("rootfs", "/assets/rootfs.ext4", False, True),)
    assert config.console is not None and config.console.type == "SERIAL"


def test_defaults_keep_what_was_given() -> None:
    given = VmConfig(
        cpu=CpuConfig(vcpu_count=4),
        memory=MemoryConfig(size_bytes=512 * MIB),
        boot=BootConfig(kernel_path="/assets/k"),
        network=(NetworkInterface(interface_id="eth0"),),
    )
    config = with_defaults(given, Defaults())
    assert config.vcpu_count == 4 and config.memory_bytes == 512 * MIB
    assert config.boot == BootConfig(kernel_path="/assets/k") and config.storage == ()
    assert config.network[0].type == "TAP" and config.network[0].guest_mac == "auto"


def test_validation_accepts_the_reference_example() -> None:
    config = VmConfig(
        cpu=CpuConfig(2, "T2"),
        memory=MemoryConfig(1073741824),
        boot=BootConfig("/assets/vmlinux-5.10", "console=ttyS0 reboot=k panic=1", "/assets/initrd"),
        storage=(StorageDevice("rootfs", "/assets/rootfs.ext4", False, True),),
        network=(
            NetworkInterface(
                "eth0",
                "TAP",
                "auto",
                RateLimit(104857600, 1048576, 100),
                host_ipv4=IpConfig("192.168.1.1", 24, "192.168.1.254"),
                guest_ipv4=IpConfig("192.168.1.100", 24),
                host_ipv6=IpConfig("2001:db8:1::1", 64, "2001:db8:1::ffff"),
                guest_ipv6=IpConfig("2001:db8:1::100", 64),
            ),
        ),
        metadata={"name": "my-vm", "project": "test"},
    )
    validate_config(config, Limits())


def test_config_round_trips_through_its_json_form() -> None:
    config = VmConfig(
        cpu=CpuConfig(2, "T2"),
        network=(
            NetworkInterface("eth0", rate_limit=RateLimit(1, 2, 3), guest_ipv6=IpConfig("fd00::2", 64)),
        ),
        metadata={"a": "b"},
    )
    data = to_dict(config)
    assert data["network"][0]["rate_limit"] == {
        "bandwidth_bytes_per_second": 1,
        "burst_bytes": 2,
        "refill_time_millis": 3,
    }
    assert from_dict(VmConfig, data) == config
    # int64 fields arrive as strings in canonical proto JSON
    assert from_dict(MemoryConfig, {"size_bytes": "1073741824"}).size_bytes == 1073741824


def test_page_tokens_are_bound_and_tamper_proof() -> None:
    tokens = PageTokens(b"k" * 32)
    token = tokens.encode("alice", "2", 42)
    assert tokens.decode(token, "alice", "2") == 42
    for customer, filt in (("bob", "2"), ("alice", "")):
        with pytest.raises(MetaldError):
            tokens.decode(token, customer, filt)
    with pytest.raises(MetaldError):
        PageTokens(b"x" * 32).decode(token, "alice", "2")
    with pytest.raises(MetaldError):
        tokens.decode(token[:-3] + "AAA", "alice", "2")


def test_quotas_at_the_exact_boundary() -> None:
    quotas = Quotas(max_vms_per_customer=2, max_vcpus_per_customer=4, max_host_memory_bytes=1024)
    check_create(quotas, customer_vms=1, host_vms=100)
    with pytest.raises(MetaldError) as caught:
        check_create(quotas, customer_vms=2, host_vms=100)
    assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert caught.value.metadata["limit"] == "max_vms_per_customer"
    check_boot(quotas, Usage(1, 2, 0), Usage(1, 2, 512), vcpus=2, memory_bytes=512)
    with pytest.raises(MetaldError) as caught:
        check_boot(quotas, Usage(1, 3, 0), Usage(1, 3, 0), vcpus=2, memory_bytes=1)
    assert caught.value.metadata["limit"] == "max_vcpus_per_customer"
    with pytest.raises(MetaldError) as caught:
        check_boot(quotas, Usage(0, 0, 0), Usage(1, 0, 512), vcpus=1, memory_bytes=513)
    assert caught.value.metadata["limit"] == "host_memory_bytes"


def test_guest_kernel_args() -> None:
    nic = NicAddress("eth0", "aa:fc:00:00:00:01", "10.0.0.2/24", "10.0.0.1", "", "")
    assert (
        guest_kernel_args("vm1", (nic,))
        == "metald.vm_id=vm1 metald.nic=aa:fc:00:00:00:01,10.0.0.2/24,10.0.0.1,,"
    )
    assert guest_kernel_args("vm1", ()) == "metald.vm_id=vm1"


def test_with_defaults_does_not_mutate_input() -> None:
    original = VmConfig()
    with_defaults(original, Defaults())
    assert original == VmConfig() and dataclasses.is_dataclass(original)
