"""The kernel command line tokens by which metald tells its guest image who and where it is."""

from __future__ import annotations

from metald.domain.model import NicAddress


def guest_kernel_args(vm_id: str, nics: tuple[NicAddress, ...]) -> str:
    """`metald.vm_id=ID` and one `metald.nic=MAC,IPV4/PFX,GW4,IPV6/PFX,GW6` per interface."""
    tokens = [f"metald.vm_id={vm_id}"]
    for nic in nics:
        fields = (nic.mac, nic.guest_ipv4, nic.gateway_ipv4, nic.guest_ipv6, nic.gateway_ipv6)
        tokens.append("metald.nic=" + ",".join(fields))
    return " ".join(tokens)
