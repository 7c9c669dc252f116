"""validate_config refuses addresses, prefixes, rate limits and kernel arguments that would pass
the old checks and then fail (or harm) later; each refusal names its field."""

from __future__ import annotations

import pytest

from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.model import BootConfig, IpConfig, NetworkInterface, RateLimit, VmConfig
from metald.domain.validation import Limits, validate_config

KERNEL = "/assets/vmlinux"


def nic(**fields: object) -> VmConfig:
    return VmConfig(network=(NetworkInterface("eth0", "TAP", "auto", **fields),))  # type: ignore[arg-type]


def refused_field(config: VmConfig) -> str:
    with pytest.raises(MetaldError) as info:
        validate_config(config, Limits())
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    field = info.value.metadata["field"]
    assert info.value.message.startswith(field)
    return field


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (nic(guest_ipv4=IpConfig("127.0.0.1", 24)), "config.network[0].guest_ipv4.address"),
        (nic(guest_ipv4=IpConfig("255.255.255.255", 24)), "config.network[0].guest_ipv4.address"),
        (nic(guest_ipv4=IpConfig("169.254.169.254", 24)), "config.network[0].guest_ipv4.address"),
        (nic(guest_ipv4=IpConfig("0.1.2.3", 24)), "config.network[0].guest_ipv4.address"),
        (nic(guest_ipv4=IpConfig("192.168.1.255", 24)), "config.network[0].guest_ipv4.address"),
        (nic(guest_ipv4=IpConfig("192.168.1.0", 24)), "config.network[0].guest_ipv4.address"),
        (nic(guest_ipv6=IpConfig("::1", 64)), "config.network[0].guest_ipv6.address"),
        (nic(guest_ipv6=IpConfig("fe80::1", 64)), "config.network[0].guest_ipv6.address"),
        (nic(guest_ipv6=IpConfig("::ffff:127.0.0.1", 64)), "config.network[0].guest_ipv6.address"),
        (nic(host_ipv4=IpConfig("127.0.0.2", 24)), "config.network[0].host_ipv4.address"),
        (nic(host_ipv4=IpConfig("127.255.255.254", 16)), "config.network[0].host_ipv4.address"),
        (nic(guest_ipv4=IpConfig("10.0.0.2", 24, "127.0.0.1")), "config.network[0].guest_ipv4.gateway"),
        (nic(guest_ipv4=IpConfig("10.0.0.2", 24, "169.254.0.1")), "config.network[0].guest_ipv4.gateway"),
        (nic(host_ipv4=IpConfig("128.0.0.1", 1)), "config.network[0].host_ipv4.prefix_length"),
        (nic(host_ipv6=IpConfig("2000::1", 3)), "config.network[0].host_ipv6.prefix_length"),
        (nic(guest_ipv4=IpConfig("10.1.0.5", 8)), "config.network[0].guest_ipv4.prefix_length"),
        (nic(guest_ipv4=IpConfig("10.1.0.5", 31)), "config.network[0].guest_ipv4.prefix_length"),
        (nic(guest_ipv6=IpConfig("fd00::5", 47)), "config.network[0].guest_ipv6.prefix_length"),
        (nic(guest_ipv6=IpConfig("fd00::5", 127)), "config.network[0].guest_ipv6.prefix_length"),
        (
            nic(rate_limit=RateLimit(2**40, 0, 100_000)),
            "config.network[0].rate_limit.refill_time_millis",
        ),
        (
            nic(rate_limit=RateLimit(2**40 + 1, 0, 0)),
            "config.network[0].rate_limit.bandwidth_bytes_per_second",
        ),
        (nic(rate_limit=RateLimit(1000, 2**32, 100)), "config.network[0].rate_limit.burst_bytes"),
        (nic(rate_limit=RateLimit(1000, 0, 3_600_001)), "config.network[0].rate_limit.refill_time_millis"),
        (nic(rate_limit=RateLimit(-1, 0, 0)), "config.network[0].rate_limit.bandwidth_bytes_per_second"),
        (VmConfig(boot=BootConfig(KERNEL, '"metald.vm_id=forged"')), "config.boot.kernel_args"),
        (VmConfig(boot=BootConfig(KERNEL, 'quiet "metald.nic=x" ro')), "config.boot.kernel_args"),
        (VmConfig(boot=BootConfig(KERNEL, 'foo="bar metald.vm_id=x"')), "config.boot.kernel_args"),
        (VmConfig(boot=BootConfig(KERNEL, 'init=/bin/sh foo="open')), "config.boot.kernel_args"),
    ],
)
def test_refused_before_anything_changes(config: VmConfig, field: str) -> None:
    assert refused_field(config) == field


@pytest.mark.parametrize(
    "config",
    [
        nic(guest_ipv4=IpConfig("192.168.1.10", 24), host_ipv4=IpConfig("192.168.1.1", 24)),
        nic(guest_ipv4=IpConfig("10.20.0.2", 16)),
        nic(guest_ipv4=IpConfig("10.20.0.1", 30)),
        nic(guest_ipv6=IpConfig("2001:db8::10", 64, "fe80::1")),  # a v6 router's link-local gateway
        nic(guest_ipv6=IpConfig("fd00:1::2", 48), host_ipv6=IpConfig("fd00:1::1", 126)),
        nic(rate_limit=RateLimit(2**40, 0, 3)),  # 2^40 B/s for 3 ms: a 3.3 GB bucket, just fits
        nic(rate_limit=RateLimit(1000, 2**32 - 1, 100)),
        nic(rate_limit=RateLimit(0, 0, 3_600_000)),  # no bandwidth: no bucket to overflow
        VmConfig(boot=BootConfig(KERNEL, 'console=ttyS0 foo="a b" quiet')),
        VmConfig(boot=BootConfig(KERNEL, "rd.metald.x=1 xmetald.y=2")),
    ],
)
def test_ordinary_values_still_pass(config: VmConfig) -> None:
    validate_config(config, Limits())
