"""CreateVm refuses bad input with INVALID_ARGUMENT (400) naming the field, and stores nothing."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.rpc import Rpc

CASES: list[tuple[str, dict[str, Any], str]] = [
    ("vcpus too many", {"cpu": {"vcpu_count": 33}}, "config.cpu.vcpu_count"),
    ("vcpus negative", {"cpu": {"vcpu_count": -1}}, "config.cpu.vcpu_count"),
    ("memory too small", {"memory": {"size_bytes": 64 * 1024 * 1024}}, "config.memory.size_bytes"),
    ("memory not MiB", {"memory": {"size_bytes": 134217729}}, "config.memory.size_bytes"),
    ("bad cpu template", {"cpu": {"vcpu_count": 1, "cpu_template": "C3"}}, "config.cpu.cpu_template"),
    ("kernel path missing", {"boot": {"kernel_args": "quiet"}}, "config.boot.kernel_path"),
    ("kernel outside assets", {"boot": {"kernel_path": "/etc/shadow"}}, "config.boot.kernel_path"),
    ("kernel dotdot", {"boot": {"kernel_path": "/assets/../etc/shadow"}}, "config.boot.kernel_path"),
    ("kernel missing file", {"boot": {"kernel_path": "/assets/nope"}}, "config.boot.kernel_path"),
    (
        "reserved kernel arg",
        {"boot": {"kernel_path": "/assets/vmlinux", "kernel_args": "metald.nic=x"}},
        "config.boot.kernel_args",
    ),
    (
        "two roots",
        {
            "storage": [
                {"device_id": "a", "path_on_host": "/assets/rootfs.ext4", "is_root_device": True},
                {"device_id": "b", "path_on_host": "/assets/data.ext4", "is_root_device": True},
            ]
        },
        "config.storage",
    ),
    (
        "duplicate device id",
        {
            "storage": [
                {"device_id": "a", "path_on_host": "/assets/rootfs.ext4", "is_root_device": True},
                {"device_id": "a", "path_on_host": "/assets/data.ext4"},
            ]
        },
        "config.storage[1].device_id",
    ),
    ("device path empty", {"storage": [{"device_id": "a"}]}, "config.storage[0].path_on_host"),
    (
        "device path /dev",
        {"storage": [{"device_id": "a", "path_on_host": "/dev/sda"}]},
        "config.storage[0].path_on_host",
    ),
    (
        "duplicate interface id",
        {"network": [{"interface_id": "eth0"}, {"interface_id": "eth0"}]},
        "config.network[1].interface_id",
    ),
    ("bad nic type", {"network": [{"interface_id": "eth0", "type": "MACVTAP"}]}, "config.network[0].type"),
    (
        "bad mac",
        {"network": [{"interface_id": "eth0", "guest_mac": "zz:00:00:00:00:00"}]},
        "config.network[0].guest_mac",
    ),
    (
        "multicast mac",
        {"network": [{"interface_id": "eth0", "guest_mac": "01:00:5e:00:00:01"}]},
        "config.network[0].guest_mac",
    ),
    (
        "v6 address in v4 field",
        {"network": [{"interface_id": "eth0", "guest_ipv4": {"address": "fd00::1", "prefix_length": 24}}]},
        "config.network[0].guest_ipv4.address",
    ),
    (
        "v4 prefix too long",
        {"network": [{"interface_id": "eth0", "guest_ipv4": {"address": "10.0.0.2", "prefix_length": 33}}]},
        "config.network[0].guest_ipv4.prefix_length",
    ),
    (
        "v6 bad gateway",
        {
            "network": [
                {
                    "interface_id": "eth0",
                    "host_ipv6": {"address": "fd00::1", "prefix_length": 64, "gateway": "10.0.0.1"},
                }
            ]
        },
        "config.network[0].host_ipv6.gateway",
    ),
    (
        "negative rate",
        {"network": [{"interface_id": "eth0", "rate_limit": {"bandwidth_bytes_per_second": -5}}]},
        "config.network[0].rate_limit.bandwidth_bytes_per_second",
    ),
    (
        "guest v4 loopback",
        {"network": [{"interface_id": "eth0", "guest_ipv4": {"address": "127.0.0.1", "prefix_length": 24}}]},
        "config.network[0].guest_ipv4.address",
    ),
    (
        "guest v4 broadcast",
        {
            "network": [
                {"interface_id": "eth0", "guest_ipv4": {"address": "255.255.255.255", "prefix_length": 24}}
            ]
        },
        "config.network[0].guest_ipv4.address",
    ),
    (
        "guest v4 metadata address",
        {
            "network": [
                {"interface_id": "eth0", "guest_ipv4": {"address": "169.254.169.254", "prefix_length": 24}}
            ]
        },
        "config.network[0].guest_ipv4.address",
    ),
    (
        "guest v6 loopback",
        {"network": [{"interface_id": "eth0", "guest_ipv6": {"address": "::1", "prefix_length": 64}}]},
        "config.network[0].guest_ipv6.address",
    ),
    (
        "guest v6 link-local",
        {"network": [{"interface_id": "eth0", "guest_ipv6": {"address": "fe80::1", "prefix_length": 64}}]},
        "config.network[0].guest_ipv6.address",
    ),
    (
        "host v4 loopback",
        {
            "network": [
                {
                    "interface_id": "eth0",
                    "host_ipv4": {"address": "127.0.0.1", "prefix_length": 24},
                    "guest_ipv4": {"address": "127.0.0.2", "prefix_length": 24},
                }
            ]
        },
        "config.network[0].host_ipv4.address",
    ),
    (
        "host v4 squatting /1",
        {
            "network": [
                {
                    "interface_id": "eth0",
                    "host_ipv4": {"address": "128.0.0.1", "prefix_length": 1},
                    "guest_ipv4": {"address": "128.0.0.2", "prefix_length": 1},
                }
            ]
        },
        "config.network[0].host_ipv4.prefix_length",
    ),
    (
        "host v6 squatting /3",
        {
            "network": [
                {
                    "interface_id": "eth0",
                    "host_ipv6": {"address": "2000::1", "prefix_length": 3},
                    "guest_ipv6": {"address": "2000::2", "prefix_length": 3},
                }
            ]
        },
        "config.network[0].host_ipv6.prefix_length",
    ),
    (
        "rate bucket overflow",
        {
            "network": [
                {
                    "interface_id": "eth0",
                    "rate_limit": {
                        "bandwidth_bytes_per_second": "1099511627776",
                        "refill_time_millis": 100000,
                    },
                }
            ]
        },
        "config.network[0].rate_limit.refill_time_millis",
    ),
    (
        "burst above 32 bits",
        {
            "network": [
                {
                    "interface_id": "eth0",
                    "rate_limit": {"bandwidth_bytes_per_second": 1000, "burst_bytes": "4294967296"},
                }
            ]
        },
        "config.network[0].rate_limit.burst_bytes",
    ),
    (
        "reserved kernel arg in quotes",
        {"boot": {"kernel_path": "/assets/vmlinux", "kernel_args": 'quiet "metald.vm_id=forged"'}},
        "config.boot.kernel_args",
    ),
    ("bad console type", {"console": {"type": "VGA"}}, "config.console.type"),
    ("console file absolute", {"console": {"output_file": "/tmp/x.log"}}, "config.console.output_file"),
    ("too much metadata", {"metadata": {f"k{i}": "v" for i in range(65)}}, "config.metadata"),
]


@pytest.mark.parametrize(("name", "config", "field"), CASES, ids=[c[0] for c in CASES])
def test_invalid_config(rpc: Rpc, name: str, config: dict[str, Any], field: str) -> None:
    status, body = rpc.error("CreateVm", {"config": config})
    assert status == 400, body
    assert body["code"] == "invalid_argument"
    assert body["message"].startswith(field), body["message"]
    detail = body["details"][0]
    assert detail["type"] == "google.rpc.ErrorInfo"
    assert detail["debug"]["metadata"]["field"] == field
    assert rpc.ok("ListVms", {}).get("total_count", 0) == 0


def test_refused_create_leaves_no_ghost_id(rpc: Rpc, customer: str) -> None:
    """A config network planning could not honour is refused up front: the id stays free."""
    vm_id = f"ghost-{customer}"
    limit = {"bandwidth_bytes_per_second": "1099511627776", "refill_time_millis": 100000}
    config = {"network": [{"interface_id": "eth0", "rate_limit": limit}]}
    status, body = rpc.error("CreateVm", {"vm_id": vm_id, "config": config})
    assert status == 400 and body["code"] == "invalid_argument", body
    assert rpc.ok("CreateVm", {"vm_id": vm_id, "config": {}})["vm_id"] == vm_id


@pytest.mark.parametrize("vm_id", ["has space", "x" * 65, "semi;colon", "ünï"])
def test_bad_client_vm_id(rpc: Rpc, vm_id: str) -> None:
    status, body = rpc.error("CreateVm", {"vm_id": vm_id, "config": {}})
    assert status == 400 and body["message"].startswith("vm_id")


def test_taken_vm_id_is_already_exists(rpc: Rpc, customer: str) -> None:
    vm_id = f"fixed-{customer}"
    rpc.create(vm_id=vm_id)
    status, body = rpc.error("CreateVm", {"vm_id": vm_id, "config": {}})
    assert status == 409 and body["code"] == "already_exists"
    other = Rpc(rpc.url, customer + "x")
    status, body = other.error("CreateVm", {"vm_id": vm_id, "config": {}})
    assert status == 409, "a taken id is taken for everyone"


def test_generated_ids_look_like_the_reference(rpc: Rpc) -> None:
    ids = [rpc.create() for _ in range(3)]
    assert all(i.startswith("vm_") and len(i) == 29 for i in ids)
    assert ids == sorted(ids), "generated ids sort by creation time"


def test_bare_create_gets_documented_defaults(rpc: Rpc) -> None:
    vm_id = rpc.create()
    info = rpc.info(vm_id)
    assert info["state"] == "VM_STATE_CREATED"
    config = info["config"]
    assert config["cpu"]["vcpu_count"] == 1
    assert int(config["memory"]["size_bytes"]) == 256 * 1024 * 1024
    assert config["boot"]["kernel_path"] == "/assets/vmlinux"
    assert config["storage"][0]["path_on_host"] == "/assets/rootfs.ext4"
    assert config["storage"][0]["is_root_device"] is True


def test_lower_camel_case_requests_are_accepted(rpc: Rpc) -> None:
    vm_id = rpc.ok("CreateVm", {"config": {"cpu": {"vcpuCount": 2}, "memory": {"sizeBytes": "268435456"}}})[
        "vm_id"
    ]
    assert rpc.info(vm_id)["config"]["cpu"]["vcpu_count"] == 2
