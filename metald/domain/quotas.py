"""Per-customer quotas and host capacity: pure arithmetic over current usage."""

from __future__ import annotations

from dataclasses import dataclass

from metald.domain.errors import ErrorCode, MetaldError


@dataclass(frozen=True)
class Usage:
    vms: int
    vcpus: int
    memory_bytes: int


@dataclass(frozen=True)
class Quotas:
    """Zero means unlimited."""

    max_vms_per_customer: int = 0
    max_vcpus_per_customer: int = 0
    max_memory_bytes_per_customer: int = 0
    max_vms: int = 0
    max_host_vcpus: int = 0
    max_host_memory_bytes: int = 0


def check_quotas(quotas: Quotas, customer: Usage, host: Usage, vcpus: int, memory_bytes: int) -> None:
    """RESOURCE_EXHAUSTED naming the first limit the new VM would cross."""
    checks = (
        ("max_vms_per_customer", quotas.max_vms_per_customer, customer.vms + 1),
        ("max_vcpus_per_customer", quotas.max_vcpus_per_customer, customer.vcpus + vcpus),
        ("max_memory_bytes_per_customer", quotas.max_memory_bytes_per_customer, customer.memory_bytes + memory_bytes),
        ("max_vms", quotas.max_vms, host.vms + 1),
        ("host_vcpus", quotas.max_host_vcpus, host.vcpus + vcpus),
        ("host_memory_bytes", quotas.max_host_memory_bytes, host.memory_bytes + memory_bytes),
    )
    for name, limit, wanted in checks:
        if limit and wanted > limit:
            raise MetaldError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"limit {name} exceeded: {wanted} > {limit}",
                reason="QUOTA_EXCEEDED",
                metadata={"limit": name, "limit_value": str(limit), "requested_total": str(wanted)},
            )
