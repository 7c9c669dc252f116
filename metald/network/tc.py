"""Token buckets as tc `tbf` qdiscs.

A qdisc shapes what a device sends, so one NIC gets two: on the TAP (what the host sends to the
guest = guest RX) and on the VM-side veth end (what the guest sends out = guest TX). The kernel
here has no `police` action; tbf is what the lab measured (0.96 MB/s at 1 MB/s).
"""

from __future__ import annotations

from metald.domain.model import RateLimit

# Two full Ethernet frames: tbf never passes a packet larger than its bucket, and with a single
# frame's worth the rate collapses on back-to-back packets.
MIN_BUCKET_BYTES = 2 * 1514
# How long a packet may wait for tokens; bounds the queue to rate*latency bytes.
LATENCY = "50ms"


def is_limited(limit: RateLimit | None) -> bool:
    return limit is not None and limit.bandwidth_bytes_per_second > 0


def bucket_bytes(limit: RateLimit) -> int:
    """Bucket size: the largest of burst_bytes, one refill period's worth, and two frames."""
    refill = limit.bandwidth_bytes_per_second * limit.refill_time_millis // 1000
    return max(limit.burst_bytes, refill, MIN_BUCKET_BYTES)


def tbf_command(device: str, limit: RateLimit) -> str:
    """One `tc -batch` line installing (or replacing) the token bucket on device."""
    rate_bits = limit.bandwidth_bytes_per_second * 8
    return (
        f"qdisc replace dev {device} root tbf rate {rate_bits}bit "
        f"burst {bucket_bytes(limit)} latency {LATENCY}"
    )
