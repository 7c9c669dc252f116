"""ServiceEvents (metald/ports.py) that only remembers what it was told."""

from __future__ import annotations

from collections import Counter


class RecordingEvents:
    def __init__(self) -> None:
        self.boots = 0
        self.backend_errors: Counter[str] = Counter()
        self.exits: Counter[str] = Counter()
        self.snapshot_pauses: list[float] = []

    def boot_finished(self, backend_type: str, seconds: float) -> None:
        self.boots += 1

    def backend_error(self, backend_type: str, operation: str) -> None:
        self.backend_errors[operation] += 1

    def backend_operation(self, backend_type: str, operation: str, seconds: float) -> None:
        pass

    def vm_exited(self, reason: str) -> None:
        self.exits[reason] += 1

    def snapshot_taken(self, backend_type: str, paused_seconds: float) -> None:
        self.snapshot_pauses.append(paused_seconds)
