"""Structured logs: JSON lines when not on a TTY, readable text on one. Secrets never logged."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

_CONTEXT_KEYS = ("request_id", "rpc", "customer_id", "vm_id", "code", "duration_ms")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"']+")


def redact(text: str) -> str:
    return _BEARER.sub(r"\1[REDACTED]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key in _CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value not in (None, ""):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(
            f"{k}={getattr(record, k)}" for k in _CONTEXT_KEYS if getattr(record, k, None) not in (None, "")
        )
        line = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if context:
            line += f"  [{context}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def configure_logging(fmt: str, level: str) -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("hypercorn.access", "aiosqlite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
