"""Checks of a clone restored from a snapshot, over the API (tests/api, tests/reliability)."""

from __future__ import annotations

import time

from tests.support.rpc import Rpc

READY = {"wait_for_ready": True, "wait_timeout_seconds": 90}


def assert_own_identity(rpc: Rpc, clone: str) -> None:
    """The clone has its own identity and the host's clock, not the snapshot's."""
    assert rpc.exec(clone, "cat", "/run/metald/vm_id").strip() == clone
    assert rpc.exec(clone, "hostname").strip() == clone
    # busybox date has whole seconds: the guest's offset lies in [s - after, s + 1 - before].
    before = time.time()
    seconds = int(rpc.exec(clone, "date", "+%s"))
    after = time.time()
    assert seconds - after < 0.5 and seconds + 1 - before > -0.5, (before, seconds, after)
