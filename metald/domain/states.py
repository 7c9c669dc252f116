"""The VM state machine: which operation is allowed from which state, and where it leads."""

from __future__ import annotations

import enum
from collections.abc import Iterable

from metald.domain.errors import invalid, precondition


class VmState(enum.IntEnum):
    """Values match the API's VmState enum."""

    UNSPECIFIED = 0
    CREATED = 1
    RUNNING = 2
    PAUSED = 3
    SHUTDOWN = 4

    @property
    def api_name(self) -> str:
        return f"VM_STATE_{self.name}"


class Operation(enum.Enum):
    BOOT = "boot"
    PAUSE = "pause"
    RESUME = "resume"
    REBOOT = "reboot"
    SHUTDOWN = "shutdown"
    DELETE = "delete"


_ALLOWED: dict[Operation, frozenset[VmState]] = {
    Operation.BOOT: frozenset({VmState.CREATED, VmState.SHUTDOWN}),
    Operation.PAUSE: frozenset({VmState.RUNNING}),
    Operation.RESUME: frozenset({VmState.PAUSED}),
    Operation.REBOOT: frozenset({VmState.RUNNING}),
    Operation.SHUTDOWN: frozenset({VmState.RUNNING, VmState.PAUSED}),
    Operation.DELETE: frozenset({VmState.CREATED, VmState.SHUTDOWN}),
}

TARGET: dict[Operation, VmState] = {
    Operation.BOOT: VmState.RUNNING,
    Operation.PAUSE: VmState.PAUSED,
    Operation.RESUME: VmState.RUNNING,
    Operation.REBOOT: VmState.RUNNING,
    Operation.SHUTDOWN: VmState.SHUTDOWN,
}

ACTIVE_STATES = frozenset({VmState.RUNNING, VmState.PAUSED})


def require_allowed(op: Operation, vm_id: str, current: VmState, *, force: bool = False) -> None:
    """Raise FAILED_PRECONDITION naming the current state unless `op` may run now.

    A forced delete is allowed from every state (it stops the VM first).
    """
    if op is Operation.DELETE and force:
        return
    if current in _ALLOWED[op]:
        return
    hint = " (use force=true)" if op is Operation.DELETE and current in ACTIVE_STATES else ""
    allowed = ", ".join(sorted(s.api_name for s in _ALLOWED[op]))
    raise precondition(
        "INVALID_STATE",
        f"cannot {op.value} VM {vm_id} in state {current.api_name}; allowed from {allowed}{hint}",
        vm_id=vm_id,
        current_state=current.api_name,
        operation=op.value,
    )


def check_state_filter(states: Iterable[VmState], field: str = "state_filter") -> None:
    if any(s is VmState.UNSPECIFIED for s in states):
        raise invalid(field, "VM_STATE_UNSPECIFIED is not a state to filter by")
