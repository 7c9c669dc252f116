"""Per-customer quotas and host capacity: pure arithmetic over current usage.

Two moments, as an operator would expect: the number of VMs is checked when a VM is created
(records and disks exist from then on); vCPUs and memory are checked when a VM is booted, over
the VMs that run (RUNNING or PAUSED), since only those consume CPU and RAM.
"""

from __future__ import annotations

from dataclasses import dataclass

from metald.domain.errors import exhausted


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


def _enforce(checks: tuple[tuple[str, int, int], ...]) -> None:
    for name, limit, wanted in checks:
        if limit and wanted > limit:
            raise exhausted(
                "QUOTA_EXCEEDED",
                f"limit {name} exceeded: {wanted} > {limit}",
                limit=name,
                limit_value=str(limit),
                requested_total=str(wanted),
            )


def check_create(quotas: Quotas, customer_vms: int, host_vms: int) -> None:
    """RESOURCE_EXHAUSTED if one more VM would cross a VM-count limit."""
    _enforce(
        (
            ("max_vms_per_customer", quotas.max_vms_per_customer, customer_vms + 1),
            ("max_vms", quotas.max_vms, host_vms + 1),
        )
    )


def check_boot(quotas: Quotas, customer: Usage, host: Usage, vcpus: int, memory_bytes: int) -> None:
    """RESOURCE_EXHAUSTED naming the first running-resource limit booting this VM would cross."""
    _enforce(
        (
            ("max_vcpus_per_customer", quotas.max_vcpus_per_customer, customer.vcpus + vcpus),
            (
                "max_memory_bytes_per_customer",
                quotas.max_memory_bytes_per_customer,
                customer.memory_bytes + memory_bytes,
            ),
            ("host_vcpus", quotas.max_host_vcpus, host.vcpus + vcpus),
            ("host_memory_bytes", quotas.max_host_memory_bytes, host.memory_bytes + memory_bytes),
        )
    )


def check_snapshot(customer_id: str, count: int, size: int, limit: int, bytes_limit: int) -> None:
    """A customer holding `count` snapshots of `size` bytes may take one more (0: no limit); on a
    host for its own snapshots, on a gateway for the customer's snapshots fleet-wide."""
    if (limit and count >= limit) or (bytes_limit and size >= bytes_limit):
        raise exhausted(
            "SNAPSHOT_QUOTA_EXCEEDED",
            f"customer {customer_id} has {count} snapshots of {size} bytes "
            f"(limits: {limit or 'none'} snapshots, {bytes_limit or 'no'} bytes)",
            customer_id=customer_id,
        )
