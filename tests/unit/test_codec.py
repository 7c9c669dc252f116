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
