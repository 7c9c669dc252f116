"""Recovery after a (re)start as a decision table: (state, pending operation, VMM alive?) -> action.

Pure: the service probes the VMM only where the answer changes the action (`Rule.needs_probe`),
then carries the action out (metald/service/recovery.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from metald.domain.pending import PendingOp
from metald.domain.states import ACTIVE_STATES, VmState


class RecoveryAction(enum.Enum):
    NOTHING = "nothing"  # at rest and nothing ran: leave it
    UNDO_CREATE = "undo_create"  # remove the half-created VM (files, addresses, record)
    FINISH_DELETE = "finish_delete"  # remove what is left of the VM, then the record
    ADOPT = "adopt"  # the VMM runs: record RUNNING/PAUSED as the VMM says
    UNDO_BOOT = "undo_boot"  # the boot never got a VMM: tear its network down, back to the state before
    FINISH_STOP = "finish_stop"  # a stop was cut short and the VMM still runs: stop it for good
    RECORD_SHUTDOWN = "record_shutdown"  # the VMM is gone (host reboot, crash): SHUTDOWN with a reason
    RESUME_SOURCE = "resume_source"  # a snapshot was cut short: the VM back in its state (run it again)
    # A clone's restore was cut short: no VMM (killed if it runs: its guest may not have its own
    # identity yet), fresh disks over the snapshot's (the guest may have written to them), CREATED.
    UNDO_RESTORE = "undo_restore"


@dataclass(frozen=True)
class Rule:
    when_alive: RecoveryAction
    when_gone: RecoveryAction

    @property
    def needs_probe(self) -> bool:
        """Whether the VMM must be looked for (re-attached to) before acting."""
        return self.when_alive is not self.when_gone


def _always(action: RecoveryAction) -> Rule:
    return Rule(action, action)


A = RecoveryAction
# (pending operation, VM at rest (False) or active (True)) -> rule. Read it row by row.
TABLE: dict[tuple[PendingOp, bool], Rule] = {
    (PendingOp.CREATING, False): _always(A.UNDO_CREATE),
    (PendingOp.CREATING, True): _always(A.UNDO_CREATE),
    (PendingOp.DELETING, False): _always(A.FINISH_DELETE),
    (PendingOp.DELETING, True): _always(A.FINISH_DELETE),
    (PendingOp.BOOTING, False): Rule(when_alive=A.ADOPT, when_gone=A.UNDO_BOOT),
    (PendingOp.BOOTING, True): Rule(when_alive=A.ADOPT, when_gone=A.RECORD_SHUTDOWN),
    (PendingOp.STOPPING, False): Rule(when_alive=A.FINISH_STOP, when_gone=A.RECORD_SHUTDOWN),
    (PendingOp.STOPPING, True): Rule(when_alive=A.FINISH_STOP, when_gone=A.RECORD_SHUTDOWN),
    (PendingOp.SNAPSHOTTING, False): _always(A.UNDO_BOOT),  # never at rest: just clear the mark
    (PendingOp.SNAPSHOTTING, True): Rule(when_alive=A.RESUME_SOURCE, when_gone=A.RECORD_SHUTDOWN),
    (PendingOp.RESTORING, False): _always(A.UNDO_RESTORE),
    (PendingOp.RESTORING, True): _always(A.UNDO_RESTORE),  # never active: a clone restores from CREATED
    (PendingOp.NONE, False): _always(A.NOTHING),
    (PendingOp.NONE, True): Rule(when_alive=A.ADOPT, when_gone=A.RECORD_SHUTDOWN),
}


def rule(state: VmState, pending: PendingOp) -> Rule:
    return TABLE[(pending, state in ACTIVE_STATES)]


def decide(state: VmState, pending: PendingOp, vmm_alive: bool) -> RecoveryAction:
    r = rule(state, pending)
    return r.when_alive if vmm_alive else r.when_gone


# Why a VM whose VMM vanished while no daemon watched is SHUTDOWN (when the backend knows no better).
VMM_GONE_REASON = "vmm_gone_while_daemon_down"
