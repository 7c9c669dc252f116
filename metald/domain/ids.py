"""VM identifiers: client-chosen ids are checked, generated ones are `vm_` + a sortable random id."""

from __future__ import annotations

import os
import re
import time

from metald.domain.errors import ErrorCode, MetaldError, invalid

VM_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
CUSTOMER_ID_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,128}")
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def new_vm_id(now_ms: int | None = None) -> str:
    """`vm_` + a 26-char ULID-style id (48-bit ms timestamp + 80 random bits), lexically time-ordered."""
    ts = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ts << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "vm_" + "".join(reversed(chars))


def check_vm_id(vm_id: str, field: str = "vm_id") -> str:
    if not VM_ID_PATTERN.fullmatch(vm_id):
        raise invalid(field, "must match [A-Za-z0-9_-]{1,64}")
    return vm_id


def check_customer_id(customer_id: str) -> str:
    if not CUSTOMER_ID_PATTERN.fullmatch(customer_id):
        raise MetaldError(ErrorCode.UNAUTHENTICATED, "invalid credentials")
    return customer_id
