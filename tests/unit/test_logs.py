"""Structured logs: one JSON object per line, credentials masked."""

from __future__ import annotations

import json
import logging

from server.logs import JsonFormatter, redact

JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ1c2VyIn0.c2lnbmF0dXJlLWJ5dGVz"


def test_redact_masks_credentials():
    text = (
        f"authorization: Bearer {JWT} key tp_live_abc123_SECRETsecret "
        "url postgresql://admin:hunter2@db:5432/prod and redis://:pw@cache:6379"
    )
    masked = redact(text)
    for secret in (JWT, "SECRETsecret", "hunter2", ":pw@"):
        assert secret not in masked
    assert "postgresql://admin:[REDACTED]@db:5432/prod" in masked


def test_bare_jwt_is_masked():
    assert JWT not in redact(f"token={JWT}")


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "t", "levelname": "INFO", "msg": msg})
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_formatter_fields_and_redaction():
    line = JsonFormatter().format(_record("login for %s", method="/x", token=f"Bearer {JWT}"))
    entry = json.loads(line)
    assert entry["level"] == "INFO"
    assert entry["method"] == "/x"
    assert JWT not in line
    assert "\n" not in line


def test_json_formatter_redacts_tracebacks():
    try:
        raise RuntimeError("connect postgresql://u:topsecret@h/db failed")
    except RuntimeError:
        import sys

        record = _record("boom")
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "topsecret" not in line
    assert "RuntimeError" in json.loads(line)["exc"]
