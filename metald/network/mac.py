"""Guest MAC addresses for "auto": stable, derived from the VM and interface ids."""

from __future__ import annotations

import hashlib

AUTO = ("", "auto")


def derive_mac(vm_id: str, interface_id: str, attempt: int = 0) -> str:
    """A locally administered unicast MAC from sha256(vm_id, interface_id[, attempt]).

    46 bits of hash survive; `attempt` > 0 yields alternatives should one collide on a bridge.
    """
    seed = f"{vm_id}\0{interface_id}" + (f"\0{attempt}" if attempt else "")
    octets = bytearray(hashlib.sha256(seed.encode()).digest()[:6])
    octets[0] = (octets[0] & 0xFC) | 0x02  # unicast (bit 0 clear), locally administered (bit 1 set)
    return ":".join(f"{b:02x}" for b in octets)
