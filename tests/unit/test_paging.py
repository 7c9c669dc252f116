"""ListVms paging as the service and the fleet gateway both read it (metald/domain/paging.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from metald.domain.errors import ErrorCode, MetaldError
from metald.domain.paging import MAX_PAGE_SIZE, PageTokens, vm_page
from metald.domain.states import VmState


@dataclass(frozen=True)
class Row:
    seq: int


TOKENS = PageTokens(b"k" * 32)


def test_a_page_is_cut_and_the_next_token_continues_after_its_last_row() -> None:
    page = vm_page(TOKENS, "alice", [VmState.RUNNING, VmState.CREATED, VmState.RUNNING], 2, "")
    assert page.states == [VmState.CREATED, VmState.RUNNING]
    assert (page.after, page.fetch) == (0, 3)
    rows, token = page.cut(TOKENS, [Row(5), Row(7), Row(9)])
    assert rows == [Row(5), Row(7)]
    following = vm_page(TOKENS, "alice", [VmState.CREATED, VmState.RUNNING], 2, token)
    assert following.after == 7
    assert following.cut(TOKENS, [Row(9)]) == ([Row(9)], "")


def test_sizes_default_and_cap() -> None:
    assert vm_page(TOKENS, "alice", [], 0, "").size == 50
    assert vm_page(TOKENS, "alice", [], 10**6, "").size == MAX_PAGE_SIZE


@pytest.mark.parametrize(
    ("states", "size", "field"),
    [([], -1, "page_size"), ([VmState.UNSPECIFIED], 1, "state_filter")],
)
def test_bad_requests_name_the_field(states: list[VmState], size: int, field: str) -> None:
    with pytest.raises(MetaldError) as caught:
        vm_page(TOKENS, "alice", states, size, "")
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert caught.value.metadata["field"] == field


def test_a_token_of_another_filter_is_refused() -> None:
    token = vm_page(TOKENS, "alice", [VmState.RUNNING], 1, "").cut(TOKENS, [Row(1), Row(2)])[1]
    with pytest.raises(MetaldError) as caught:
        vm_page(TOKENS, "alice", [VmState.PAUSED], 1, token)
    assert caught.value.metadata["field"] == "page_token"
