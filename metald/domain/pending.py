"""Multi-step operations in flight: marked on the VM record before the first side effect and
cleared after the last, so a daemon killed halfway knows what to finish or undo (domain/recovery.py)."""

from __future__ import annotations

import enum


class PendingOp(enum.StrEnum):
    """Stored as its value (text); the empty string is "nothing in flight"."""

    NONE = ""
    CREATING = "creating"
    BOOTING = "booting"
    STOPPING = "stopping"
    DELETING = "deleting"
    SNAPSHOTTING = "snapshotting"  # the VM's snapshot is being taken (it may be stopped for it)
    RESTORING = "restoring"  # a clone's first boot: its snapshot is being restored

    @classmethod
    def of(cls, stored: str) -> PendingOp:
        """The operation a record names; an unknown value (a newer release's) counts as none."""
        try:
            return cls(stored)
        except ValueError:
            return cls.NONE
