"""A clone's configuration: what comes from its snapshot, what is the clone's own.

CPU, memory, boot and storage are the snapshot's: the restored RAM and device state were made by
exactly that machine. A request may repeat them; a different value is refused naming the field.
Network interfaces, metadata and console output are the clone's own, with two limits the device
state sets: as many interfaces as the snapshot's VM had (each one is a virtio-net device in the
restored state) and the same console type (the virtio console is a device too).
"""

from __future__ import annotations

import dataclasses

from metald.domain.errors import invalid
from metald.domain.model import VmConfig


def _differs(asked: object, snapshot: object, default: object) -> bool:
    return asked != default and asked != snapshot


def clone_config(asked: VmConfig, snapshot: VmConfig) -> VmConfig:
    """The clone's config from the request's (`asked`, before defaults) and the snapshot's."""
    assert snapshot.cpu is not None and snapshot.memory is not None and snapshot.boot is not None
    if asked.cpu is not None:
        if _differs(asked.cpu.vcpu_count, snapshot.cpu.vcpu_count, 0):
            raise _from_snapshot("config.cpu.vcpu_count", snapshot.cpu.vcpu_count)
        if _differs(asked.cpu.cpu_template, snapshot.cpu.cpu_template, ""):
            raise _from_snapshot("config.cpu.cpu_template", snapshot.cpu.cpu_template)
    if asked.memory is not None and _differs(asked.memory.size_bytes, snapshot.memory.size_bytes, 0):
        raise _from_snapshot("config.memory.size_bytes", snapshot.memory.size_bytes)
    if asked.boot is not None:
        for name in ("kernel_path", "kernel_args", "initrd_path"):
            if _differs(getattr(asked.boot, name), getattr(snapshot.boot, name), ""):
                raise _from_snapshot(f"config.boot.{name}", getattr(snapshot.boot, name))
    if asked.storage and asked.storage != snapshot.storage:
        raise invalid("config.storage", "a clone's disks are its snapshot's; leave storage out")
    if len(asked.network) != len(snapshot.network):
        raise invalid(
            "config.network",
            f"a clone has as many network interfaces as its snapshot's VM ({len(snapshot.network)})",
        )
    console = asked.console or snapshot.console
    snapshot_type = snapshot.console.type if snapshot.console else ""
    if console is not None and asked.console is not None and _differs(asked.console.type, snapshot_type, ""):
        raise _from_snapshot("config.console.type", snapshot_type)
    if console is not None and not console.type:
        console = dataclasses.replace(console, type=snapshot_type)
    return dataclasses.replace(
        snapshot, network=asked.network, metadata=dict(asked.metadata), console=console
    )


def _from_snapshot(field: str, value: object) -> Exception:
    return invalid(field, f"comes from the snapshot ({value!r}); leave it out or repeat it")
