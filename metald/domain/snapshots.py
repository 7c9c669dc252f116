"""A snapshot of a VM (RAM, device state and disks at one stop) that clones are started from.

A snapshot belongs to the customer of its source VM. Deleting it hides it at once (`deleted`);
its files stay until the last clone made from it (a VM whose `snapshot_id` names it) is gone,
and only then is the record purged. `pending` marks a snapshot still being written: not listed,
and finished or undone by recovery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from metald.domain import ids
from metald.domain.model import VmConfig

SNAPSHOT_ID_PREFIX = "snap_"
PENDING_CREATING = "creating"


@dataclass
class Snapshot:
    snapshot_id: str
    customer_id: str
    source_vm_id: str
    # The source's config at the snapshot: CPU, memory, boot and storage of every clone.
    config: VmConfig
    created_at: datetime
    size_bytes: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    warm_pool_size: int = 0
    pending: str = ""
    deleted: bool = False
    # Insertion order, assigned by the store; the keyset for pagination.
    seq: int = 0


def new_snapshot_id(now_ms: int | None = None) -> str:
    """`snap_` + the same sortable random id as generated VM ids."""
    return SNAPSHOT_ID_PREFIX + ids.new_vm_id(now_ms).removeprefix("vm_")


def check_snapshot_id(snapshot_id: str, field_name: str = "snapshot_id") -> str:
    """Client-chosen snapshot ids follow the rules of VM ids."""
    return ids.check_vm_id(snapshot_id, field_name)
