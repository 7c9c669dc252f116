"""Structured logs: JSON lines when not on a TTY, readable text on one. Secrets never logged."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

_CONTEXT_KEYS = ("request_id", "rpc", "customer_id", "vm_id", "code", "duration_ms")
# Credentials, wherever they appear (a message, a logged header such as x-request-id, a traceback):
# anything after "Bearer", development tokens, and JWTs (three base64url parts, the first `eyJ`).
_SECRETS = re.compile(
    r"(?i)(?P<bearer>bearer\s+)[^\s\"']+|dev_customer_[A-Za-z0-9_.@-]+|eyJ[\w-]*\.[\w-]+\.[\w-]*"
)


def _replace(match: re.Match[str]) -> str:
    return (match.group("bearer") or "") + "[REDACTED]"


def redact(text: str) -> str:
    return _SECRETS.sub(_replace, text)


def has_secret(text: str) -> bool:
    return _SECRETS.search(text) is not None


def _context(record: logging.LogRecord) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in _CONTEXT_KEYS:
        value = getattr(record, key, None)
        if value not in (None, ""):
            out[key] = value
    # One search over all the values joined instead of one per value (a log line per RPC pays it):
    # a credential in any value is found in the join; only then are they redacted one by one.
    if has_secret("\0".join(v for v in out.values() if isinstance(v, str))):
        out = {k: redact(v) if isinstance(v, str) else v for k, v in out.items()}
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        entry.update(_context(record))
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(f"{k}={v}" for k, v in _context(record).items())
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
    # Neither formatter writes the caller's file and line, thread or process: a record need not
    # look them up (the caller's frame walk is most of a LogRecord's cost).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    for noisy in ("hypercorn.access", "aiosqlite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
