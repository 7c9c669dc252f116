"""What happened to a VM, as the watch stream reports it: one event per recorded change.

Events are written by the store in the same transaction as the VM record change they describe,
so a watcher misses nothing the store knows. `seq` is the store's order (0 until stored).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from metald.domain.states import VmState


class VmEventType(enum.IntEnum):
    """Values match the API's VmEventType enum."""

    UNSPECIFIED = 0
    CREATED = 1
    STATE_CHANGED = 2
    GUEST_READY = 3
    EXITED = 4
    DELETED = 5


@dataclass(frozen=True)
class VmEvent:
    vm_id: str
    customer_id: str
    type: VmEventType
    state: VmState
    previous_state: VmState
    reason: str
    at: datetime
    seq: int = 0
