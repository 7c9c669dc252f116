"""Names of the namespaces and devices metald creates (Linux caps interface names at 15 chars).

Per VM everything hangs off id8 = the first 8 hex digits of sha256(vm_id): generated VM ids share
their leading time digits, so a plain prefix of the id would collide between VMs created together.
"""

from __future__ import annotations

import hashlib
import re

IFNAMSIZ = 15  # usable characters of an interface name (16 with the NUL)
MAX_NICS = 10  # keeps "tap_<id8>_<i>" within IFNAMSIZ

VM_NETNS_PREFIX = "ns_vm_"
HOST_VETH_PREFIX = "vh_"
CUSTOMER_BRIDGE_PREFIX = "mb_"
HOLDER_NETNS_PREFIX = "ns_held_"

_VM_NETNS = re.compile(r"ns_vm_([0-9a-f]{8})")
_HOST_VETH = re.compile(r"vh_([0-9a-f]{8})(?:_\d)?")


def id8(vm_id: str) -> str:
    return hashlib.sha256(vm_id.encode()).hexdigest()[:8]


def vm_netns(vm_id: str) -> str:
    return VM_NETNS_PREFIX + id8(vm_id)


def _indexed(prefix: str, vm_id: str, index: int) -> str:
    if not 0 <= index < MAX_NICS:
        raise ValueError(f"NIC index {index} out of range")
    base = prefix + id8(vm_id)
    return base if index == 0 else f"{base}_{index}"


def tap_device(vm_id: str, index: int) -> str:
    """The TAP QEMU opens, inside the VM's namespace."""
    return _indexed("tap_", vm_id, index)


def host_veth(vm_id: str, index: int) -> str:
    """Host-namespace end of the veth pair, a port of the customer bridge."""
    return _indexed(HOST_VETH_PREFIX, vm_id, index)


def holder_netns(holder: str) -> str:
    """The namespace holding the TAPs of a VMM started before its VM (a warm pool slot)."""
    return HOLDER_NETNS_PREFIX + holder


def held_tap(index: int) -> str:
    """A TAP in a holder's namespace, until it is moved into its VM's under tap_device()."""
    return f"held{index}"


def vm_bridge(index: int) -> str:
    """Bridge inside the VM namespace joining the TAP and the uplink (names are per namespace)."""
    return f"br{index}"


def vm_uplink(index: int) -> str:
    """VM-namespace end of the veth pair."""
    return f"up{index}"


def customer_bridge(network_index: int) -> str:
    """The customer's bridge, named after its IPAM network index: unique by construction,
    unlike a hash of the customer id."""
    return f"{CUSTOMER_BRIDGE_PREFIX}{network_index}"


def netns_id8(name: str) -> str | None:
    """id8 of a VM namespace name, None if the name is not one of ours."""
    match = _VM_NETNS.fullmatch(name)
    return match.group(1) if match else None


def host_veth_id8(name: str) -> str | None:
    match = _HOST_VETH.fullmatch(name)
    return match.group(1) if match else None
