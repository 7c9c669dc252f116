"""ListVms paging: opaque, tamper-proof page tokens (keyset: the last seq served, bound to the caller
and the state filter) and the reading of a ListVms request into the page to fetch."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from metald.domain.errors import invalid
from metald.domain.states import VmState, check_state_filter

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


class _Keyed(Protocol):
    @property
    def seq(self) -> int: ...


R = TypeVar("R", bound=_Keyed)


class PageTokens:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:16]

    def encode(self, customer_id: str, filter_key: str, after_seq: int) -> str:
        payload = json.dumps({"c": customer_id, "f": filter_key, "s": after_seq}, separators=(",", ":"))
        raw = payload.encode()
        return base64.urlsafe_b64encode(self._mac(raw) + raw).decode().rstrip("=")

    def decode(self, token: str, customer_id: str, filter_key: str) -> int:
        """The seq to continue after; INVALID_ARGUMENT for a forged, foreign or stale-filter token."""
        try:
            blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except ValueError:
            raise invalid("page_token", "malformed page token") from None
        mac, raw = blob[:16], blob[16:]
        if len(mac) != 16 or not hmac.compare_digest(mac, self._mac(raw)):
            raise invalid("page_token", "invalid page token")
        data = json.loads(raw)
        if data.get("c") != customer_id:
            raise invalid("page_token", "page token belongs to another caller")
        if data.get("f") != filter_key:
            raise invalid("page_token", "page token was issued for another state_filter")
        return int(data["s"])


@dataclass(frozen=True)
class VmPage:
    """The page a ListVms request asks for: which states (distinct, ordered), after which seq, how many."""

    customer_id: str
    states: list[VmState]
    filter_key: str
    after: int
    size: int

    @property
    def fetch(self) -> int:
        """How many rows to read: one more than the page tells whether another page follows."""
        return self.size + 1

    def cut(self, tokens: PageTokens, rows: list[R]) -> tuple[list[R], str]:
        """The rows of this page (of the `fetch` read) and the token of the next page ("" at the end)."""
        page = rows[: self.size]
        more = len(rows) > self.size
        return page, tokens.encode(self.customer_id, self.filter_key, page[-1].seq) if more else ""


def page_size(requested: int) -> int:
    """A page size asked for (0: the default), capped."""
    if requested < 0:
        raise invalid("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def vm_page(
    tokens: PageTokens, customer_id: str, states: Sequence[VmState], requested: int, page_token: str
) -> VmPage:
    """Read a ListVms request: INVALID_ARGUMENT for a bad size, filter or token."""
    size = page_size(requested)
    check_state_filter(states)
    wanted = sorted(set(states))
    filter_key = ",".join(str(int(s)) for s in wanted)
    after = tokens.decode(page_token, customer_id, filter_key) if page_token else 0
    return VmPage(customer_id, wanted, filter_key, after, size)
