"""ListVms: keyset pages that neither skip nor repeat while VMs come and go; tamper-proof tokens."""

from __future__ import annotations

import threading

from tests.support.rpc import Rpc


def _walk(
    rpc: Rpc, page_size: int, churn: list[str] | None = None, **filters: object
) -> tuple[list[str], int]:
    seen: list[str] = []
    token = ""
    total = 0
    while True:
        page = rpc.ok("ListVms", {"page_size": page_size, "page_token": token, **filters})
        seen += [v["vm_id"] for v in page.get("vms", [])]
        total = page["total_count"]
        if churn is not None:  # between pages, another client creates and deletes VMs
            churn.append(rpc.create())
            rpc.ok("DeleteVm", {"vm_id": churn.pop(0)})
        token = page.get("next_page_token", "")
        if not token:
            return seen, total


def test_paging_over_120_vms_with_churn(rpc: Rpc) -> None:
    stable = [rpc.create() for _ in range(125)]
    churn = [rpc.create() for _ in range(3)]
    seen, total = _walk(rpc, 17, churn)
    assert len(seen) == len(set(seen)), "no VM repeated"
    assert set(stable) <= set(seen), "no stable VM skipped"
    assert total == 128
    ordered = [v for v in seen if v in stable]
    assert ordered == stable, "pages come in creation order"


def test_concurrent_creates_do_not_break_paging(rpc: Rpc) -> None:
    initial = [rpc.create() for _ in range(30)]
    stop = threading.Event()
    extra: list[str] = []

    def creator() -> None:
        while not stop.is_set() and len(extra) < 40:
            extra.append(rpc.create())

    t = threading.Thread(target=creator)
    t.start()
    try:
        seen, _ = _walk(rpc, 7)
    finally:
        stop.set()
        t.join()
    assert len(seen) == len(set(seen))
    assert set(initial) <= set(seen)


def test_default_and_max_page_size(rpc: Rpc) -> None:
    for _ in range(55):
        rpc.create()
    page = rpc.ok("ListVms", {})
    assert len(page["vms"]) == 50 and page["next_page_token"]
    page = rpc.ok("ListVms", {"page_size": 5000})
    assert len(page["vms"]) == 55 and not page.get("next_page_token")


def test_state_filter(rpc: Rpc) -> None:
    ids = [rpc.create() for _ in range(3)]
    assert (
        rpc.ok("ListVms", {"state_filter": ["VM_STATE_RUNNING", "VM_STATE_PAUSED"]}).get("total_count", 0)
        == 0
    )
    page = rpc.ok("ListVms", {"state_filter": ["VM_STATE_CREATED"]})
    assert {v["vm_id"] for v in page["vms"]} == set(ids)
    status, _ = rpc.error("ListVms", {"state_filter": ["VM_STATE_UNSPECIFIED"]})
    assert status == 400


def test_forged_and_foreign_tokens_are_refused(rpc: Rpc, customer: str) -> None:
    for _ in range(4):
        rpc.create()
    token = rpc.ok("ListVms", {"page_size": 2})["next_page_token"]
    assert token
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for bad in (forged, "not-a-token", "eyJvZmZzZXQiOjUwfQ=="):
        status, body = rpc.error("ListVms", {"page_token": bad})
        assert status == 400 and body["message"].startswith("page_token"), body
    status, body = rpc.error("ListVms", {"page_token": token}, customer="someone-" + customer)
    assert status == 400
    status, body = rpc.error("ListVms", {"page_token": token, "state_filter": ["VM_STATE_RUNNING"]})
    assert status == 400, "a token only continues the listing it came from"


def test_created_at_is_rfc3339(rpc: Rpc) -> None:
    rpc.create()
    created = rpc.ok("ListVms", {})["vms"][0]["created_at"]
    assert created.endswith("Z") and "T" in created
