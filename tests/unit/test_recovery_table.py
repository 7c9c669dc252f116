"""The recovery decision table, row by row: (state, pending operation, VMM alive?) -> action."""

from __future__ import annotations

import itertools

import pytest

from metald.domain.pending import PendingOp
from metald.domain.recovery import TABLE, RecoveryAction, decide, rule
from metald.domain.states import VmState

A = RecoveryAction
S = VmState
P = PendingOp
STATES = [S.CREATED, S.RUNNING, S.PAUSED, S.SHUTDOWN]

ROWS = [
    # state, pending, vmm alive, action
    (S.CREATED, P.CREATING, False, A.UNDO_CREATE),
    (S.CREATED, P.DELETING, False, A.FINISH_DELETE),
    (S.SHUTDOWN, P.DELETING, False, A.FINISH_DELETE),
    (S.RUNNING, P.DELETING, True, A.FINISH_DELETE),  # forced delete of a running VM cut short
    (S.CREATED, P.BOOTING, True, A.ADOPT),  # the VMM started before the kill
    (S.CREATED, P.BOOTING, False, A.UNDO_BOOT),
    (S.SHUTDOWN, P.BOOTING, True, A.ADOPT),
    (S.SHUTDOWN, P.BOOTING, False, A.UNDO_BOOT),
    (S.RUNNING, P.STOPPING, True, A.FINISH_STOP),
    (S.RUNNING, P.STOPPING, False, A.RECORD_SHUTDOWN),
    (S.PAUSED, P.STOPPING, True, A.FINISH_STOP),
    (S.PAUSED, P.STOPPING, False, A.RECORD_SHUTDOWN),
    (S.RUNNING, P.NONE, True, A.ADOPT),  # daemon restart, guest kept running
    (S.PAUSED, P.NONE, True, A.ADOPT),
    (S.RUNNING, P.NONE, False, A.RECORD_SHUTDOWN),  # host reboot, VMM crash while down
    (S.PAUSED, P.NONE, False, A.RECORD_SHUTDOWN),
    (S.RUNNING, P.SNAPSHOTTING, True, A.RESUME_SOURCE),  # killed while the VM was stopped for a save
    (S.PAUSED, P.SNAPSHOTTING, True, A.RESUME_SOURCE),  # back to PAUSED, as it was
    (S.RUNNING, P.SNAPSHOTTING, False, A.RECORD_SHUTDOWN),
    (S.CREATED, P.RESTORING, True, A.UNDO_RESTORE),  # a clone's restore cut short: its guest may
    (S.CREATED, P.RESTORING, False, A.UNDO_RESTORE),  # lack its own identity, its disks may have moved
    (S.CREATED, P.NONE, False, A.NOTHING),
    (S.SHUTDOWN, P.NONE, False, A.NOTHING),
]


@pytest.mark.parametrize(("state", "pending", "alive", "action"), ROWS)
def test_row(state: VmState, pending: PendingOp, alive: bool, action: RecoveryAction) -> None:
    assert decide(state, pending, alive) is action


def test_table_is_total() -> None:
    for state, pending, alive in itertools.product(STATES, PendingOp, (True, False)):
        assert isinstance(decide(state, pending, alive), RecoveryAction)
    assert len(TABLE) == len(PendingOp) * 2


@pytest.mark.parametrize(
    ("state", "pending", "probe"),
    [
        (S.CREATED, P.CREATING, False),
        (S.SHUTDOWN, P.DELETING, False),
        (S.CREATED, P.NONE, False),  # 10k VMs at rest cost no VMM probe at start
        (S.SHUTDOWN, P.NONE, False),
        (S.RUNNING, P.NONE, True),
        (S.CREATED, P.BOOTING, True),
        (S.RUNNING, P.STOPPING, True),
    ],
)
def test_probe_only_where_it_decides(state: VmState, pending: PendingOp, probe: bool) -> None:
    assert rule(state, pending).needs_probe is probe


def test_unknown_pending_value_counts_as_none() -> None:
    assert PendingOp.of("migrating") is P.NONE
    assert PendingOp.of("booting") is P.BOOTING
    assert PendingOp.BOOTING == "booting"  # stored as its text
