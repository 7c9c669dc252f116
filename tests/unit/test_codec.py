"""The JSON codec: proto field names, 64-bit integers as numbers when exact, both spellings read."""

from __future__ import annotations

import json

from metald.api.codec import SnakeCaseJsonCodec
from metald.gen.vmprovisioner.v1 import vm_pb as pb

codec = SnakeCaseJsonCodec()


def test_int64_are_numbers_at_every_depth() -> None:
    message = pb.ListVmsResponse(
        vms=[
            pb.VmInfo(
                vm_id="v",
                config=pb.VmConfig(
                    memory=pb.MemoryConfig(size_bytes=1073741824),
                    network=[
                        pb.NetworkInterface(rate_limit=pb.RateLimit(bandwidth_bytes_per_second=104857600))
                    ],
                ),
            )
        ],
        total_count=1,
    )
    data = json.loads(codec.encode(message))
    assert data["vms"][0]["config"]["memory"]["size_bytes"] == 1073741824
    assert data["vms"][0]["config"]["network"][0]["rate_limit"]["bandwidth_bytes_per_second"] == 104857600
    assert data["total_count"] == 1


def test_unsafe_integers_stay_strings() -> None:
    data = json.loads(codec.encode(pb.VmMetrics(cpu_time_nanos=2**60)))
    assert data == {"cpu_time_nanos": str(2**60)}


def test_decode_accepts_both_spellings_and_number_forms() -> None:
    a = codec.decode(b'{"config": {"memory": {"size_bytes": 268435456}}}', pb.CreateVmRequest)
    b = codec.decode(b'{"config": {"memory": {"sizeBytes": "268435456"}}}', pb.CreateVmRequest)
    assert a == b and a.config.memory.size_bytes == 268435456
    assert codec.decode(b"", pb.ListVmsRequest) == pb.ListVmsRequest()


def test_config_proto_round_trip_matches_the_json_form() -> None:
    from metald.api.convert import config_from_proto, config_to_proto
    from metald.domain import model

    config = model.VmConfig(
        cpu=model.CpuConfig(2, "T2"),
        memory=model.MemoryConfig(1 << 30),
        boot=model.BootConfig("/assets/vmlinux", "console=ttyS0", "/assets/initrd"),
        storage=(model.StorageDevice("root", "/assets/rootfs.ext4", False, True),),
        network=(
            model.NetworkInterface(
                "eth0",
                "TAP",
                "auto",
                model.RateLimit(1, 2, 3),
                host_ipv4=model.IpConfig("10.0.0.1", 24, "10.0.0.254"),
                guest_ipv6=model.IpConfig("fd00::2", 64),
            ),
        ),
        console=model.ConsoleConfig("SERIAL", "c.log"),
        metadata={"k": "v"},
    )
    message = config_to_proto(config)
    assert model.from_dict(model.VmConfig, json.loads(message.to_json(use_proto_field_name=True))) == config
    assert message.network[0].host_ipv4.gateway == "10.0.0.254"
    assert config_from_proto(message) == config
    assert config_from_proto(None) == model.VmConfig()


def _vm_with(metadata: dict[str, str], size_bytes: int) -> pb.ListVmsResponse:
    config = pb.VmConfig(memory=pb.MemoryConfig(size_bytes=size_bytes), metadata=metadata)
    return pb.ListVmsResponse(vms=[pb.VmInfo(vm_id="v", config=config)], total_count=1)


def test_text_rewrite_leaves_strings_and_map_values_alone() -> None:
    """The 64-bit rewrite works on the JSON text: a metadata key named like a 64-bit field, or a
    value that looks like one, stays a string; negative and unsafe values are right too."""
    for metadata in ({"size_bytes": "12"}, {"note": ',"size_bytes":"5"'}, {"x": '{"size_bytes":"7"}'}):
        for size in (256, -5, 2**60):
            data = json.loads(codec.encode(_vm_with(metadata, size)))
            assert data["vms"][0]["config"]["metadata"] == metadata
            assert data["vms"][0]["config"]["memory"]["size_bytes"] == (
                size if abs(size) < 2**53 else str(size)
            )
