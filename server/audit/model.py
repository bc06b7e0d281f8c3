"""Audit domain types and the canonical entry encoding (stdlib only).

An entry's *body* is the exact byte string its Merkle leaf hash covers: compact JSON with
sorted keys, ASCII only (non-ASCII escaped), no floats, carrying the log id and the entry's own
index, so a body moved to another position or another tenant's log no longer verifies even on
its own. docs/audit-format.md specifies it for verifiers in other languages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1
SYSTEM_TENANT = "_system"
"""The log of calls that carry no authenticated tenant (rejected credentials, health)."""

CALL = "call"
EVENT = "event"
GAP = "gap"
ACCESS = "access"
SECURITY = "security"


def log_id(tenant_id: str) -> str:
    """The identity of a tenant's log, as signed in its checkpoints."""
    return f"trustplane.audit/{tenant_id}"


@dataclass(frozen=True)
class Record:
    """One thing to append: a call seen by the interceptor or an event from a runtime."""

    tenant_id: str
    kind: str
    time_ms: int
    method: str
    code: str
    reason: str = ""
    subject: str = ""
    subject_type: str = ""
    actors: tuple[str, ...] = ()  # delegation chain, current actor first
    session_id: str = ""
    request_id: str = ""
    idempotency_key: str = ""
    replayed: bool = False
    request_digest: str = ""
    peer: str = ""
    latency_us: int = 0
    resource: str = ""
    event_type: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    audit_class: str = ACCESS
    occurred_at_ms: int = 0
    data_subject: str = ""  # the opaque reference of the subject `personal` is about
    personal: str = ""  # base64 ciphertext of the personal data under that subject's key

    @property
    def actor(self) -> str:
        """The identity that acted: the current delegate, else the subject."""
        return self.actors[0] if self.actors else self.subject


def encode(record: Record, index: int) -> bytes:
    """The canonical body of `record` at position `index` of its tenant's log.

    Keys are written already sorted (cheaper than `sort_keys` on the hot path; a unit test
    checks the result equals `canonical_json` of the same fields).
    """
    fields = {
        "actors": list(record.actors),
        "attributes": dict(sorted(record.attributes.items())),
        "audit_class": record.audit_class,
        "code": record.code,
        "event_type": record.event_type,
        "idempotency_key": record.idempotency_key,
        "index": index,
        "kind": record.kind,
        "latency_us": record.latency_us,
        "log": log_id(record.tenant_id),
        "method": record.method,
        "occurred_at_ms": record.occurred_at_ms,
        "peer": record.peer,
        "personal": None,
        "reason": record.reason,
        "replayed": record.replayed,
        "request_digest": record.request_digest,
        "request_id": record.request_id,
        "resource": record.resource,
        "session_id": record.session_id,
        "subject": record.subject,
        "subject_type": record.subject_type,
        "time_ms": record.time_ms,
        "v": FORMAT_VERSION,
    }
    if record.data_subject:
        fields["personal"] = {"ciphertext": record.personal, "subject": record.data_subject}
    else:
        del fields["personal"]
    return _ENCODER.encode(fields).encode()


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, check_circular=False)


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def decode(body: str) -> dict[str, Any]:
    """The fields of a stored body (trusted input: written by `encode`)."""
    fields: dict[str, Any] = json.loads(body)
    return fields


class BatchRejected(Exception):
    """The database refused a batch for what it holds, not for being unreachable: it was rolled
    back, and appending it unchanged can never succeed. `cause` names the error class."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"audit batch rejected ({cause})")
        self.cause = cause


@dataclass(frozen=True)
class StoredEntry:
    """An entry as read back: its index, leaf hash, and body (None after retention)."""

    index: int
    leaf_hash: bytes
    body: str | None


@dataclass(frozen=True)
class EntryFilter:
    """ListEntries filters; empty strings and None match everything."""

    start_ms: int | None = None
    end_ms: int | None = None
    subject: str = ""
    actor: str = ""
    session_id: str = ""
    method: str = ""
    code: str = ""
    resource: str = ""
    kind: str = ""
    agent: str = ""  # the subject, or anywhere in the delegation chain

    def fingerprint(self) -> str:
        return canonical_json(self.__dict__).decode()


@dataclass(frozen=True)
class Settings:
    """A tenant's audit settings (`revision` backs the etag)."""

    retention_days: int
    revision: int


@dataclass(frozen=True)
class EventInput:
    """One event as an agent runtime reports it (validated by `AuditLog.append_events`)."""

    event_type: str
    resource: str = ""
    code: str = ""
    session_id: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    occurred_at_ms: int = 0
    data_subject: str = ""
    personal_data: Mapping[str, str] = field(default_factory=dict)
