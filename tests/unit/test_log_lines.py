"""The JSON log line of an RPC: its context fields, and credentials redacted wherever they are."""

from __future__ import annotations

import json
import logging

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from metald.api.interceptor import request_id_for, result_code
from metald.logs import JsonFormatter, TextFormatter

FIELDS = {"request_id": "r1", "rpc": "GetVmInfo", "customer_id": "acme", "vm_id": "", "code": "ok"}


def _record(**fields: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "metald.rpc", logging.INFO, __file__, 1, "rpc %s %s", ("GetVmInfo", "ok"), None
    )
    record.__dict__.update({**FIELDS, "duration_ms": 0.42, **fields})
    return record


def test_a_clean_line_keeps_every_field_and_leaves_out_empty_ones() -> None:
    line = json.loads(JsonFormatter().format(_record()))
    assert line["msg"] == "rpc GetVmInfo ok" and line["duration_ms"] == 0.42
    assert {k: line[k] for k in ("request_id", "rpc", "customer_id", "code")} == {
        k: v for k, v in FIELDS.items() if v
    }
    assert "vm_id" not in line


@pytest.mark.parametrize(
    "field", ["request_id", "customer_id", "vm_id"], ids=["request_id", "customer_id", "vm_id"]
)
@pytest.mark.parametrize("secret", ["Bearer abc.def", "dev_customer_acme", "eyJhbGci.eyJzdWIi.sig"])
def test_a_credential_in_any_field_is_redacted_there_only(field: str, secret: str) -> None:
    record = _record(**{field: f"x {secret}"})
    line = json.loads(JsonFormatter().format(record))
    assert secret not in json.dumps(line) and "[REDACTED]" in line[field]
    assert all(line[k] == v for k, v in FIELDS.items() if v and k != field)
    assert secret not in TextFormatter().format(record)


def test_values_that_only_match_joined_are_left_as_they_are() -> None:
    line = json.loads(JsonFormatter().format(_record(customer_id="x bearer ", vm_id="vm_a")))
    assert (line["customer_id"], line["vm_id"]) == ("x bearer ", "vm_a")


def test_result_codes_and_request_ids() -> None:
    assert result_code(None) == "ok"
    assert result_code(ConnectError(Code.NOT_FOUND, "gone")) == "not_found"
    assert result_code(ValueError("boom")) == "internal"
    fresh = {request_id_for("") for _ in range(100)}
    assert len(fresh) == 100 and all(len(r) == 16 and int(r, 16) >= 0 for r in fresh)
    assert request_id_for("mine") == "mine"
    assert request_id_for("Bearer tok") not in ("Bearer tok", "")
