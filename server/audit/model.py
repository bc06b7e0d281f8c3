"""Audit domain types and the canonical entry encoding (stdlib only).

An entry's *body* is the exact byte string its Merkle leaf hash covers: compact JSON with
sorted keys, ASCII only (non-ASCII escaped), no floats, carrying the log id and the entry's own
index, so a body moved to another position or another tenant's log no longer verifies even on
its own. docs/audit-format.md specifies it for verifiers in other languages.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
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


@dataclass(slots=True)
class Record:
    """One thing to append: a call seen by the interceptor or an event from a runtime.

    Never changed once made (`dataclasses.replace` makes a changed copy). Not `frozen`: one is
    built per entry on the append path, and a frozen dataclass's `__init__` (an
    `object.__setattr__` per field) costs about three times as much."""

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
    """The canonical body of `record` at position `index` of its tenant's log."""
    return _fill(_segments(record), record, index)


def encode_all(records: Sequence[Record], first: int) -> list[bytes]:
    """The bodies of `records` at indexes `first`, `first + 1`, ... (`encode` of each).

    A call's events share every field but the few an event sets itself; the JSON of the shared
    ones is written once per run of records that share them (`_segments`).
    """
    bodies = []
    shared: tuple[Any, ...] = ()
    segments: tuple[str, ...] = ()
    for offset, record in enumerate(records):
        key = _shared(record)
        if key != shared:
            shared, segments = key, _segments(record)
        bodies.append(_fill(segments, record, first + offset))
    return bodies


# How bodies are written: directly rather than through `json.dumps` of a dict (one is written
# per entry; this is several times cheaper), keys in sorted order, strings escaped by the very
# function the standard encoder uses with `ensure_ascii` (`encode_basestring_ascii`), integers
# as `repr`. A property test checks that a body parses to exactly the record's fields and equals
# `canonical_json` of them.


def _shared(r: Record) -> tuple[Any, ...]:
    """The fields `_segments` writes: all but those `_fill` writes."""
    return (
        r.tenant_id,
        r.kind,
        r.time_ms,
        r.method,
        r.reason,
        r.subject,
        r.subject_type,
        r.actors,
        r.request_id,
        r.idempotency_key,
        r.replayed,
        r.request_digest,
        r.peer,
        r.latency_us,
        r.audit_class,
    )


def _segments(r: Record) -> tuple[str, ...]:
    """The JSON between the per-entry fields, in key order."""
    s = _string
    return (
        f'{{"actors":[{",".join(map(s, r.actors))}],"attributes":{{',
        f'}},"audit_class":{s(r.audit_class)},"code":',
        ',"event_type":',
        f',"idempotency_key":{s(r.idempotency_key)},"index":',
        f',"kind":{s(r.kind)},"latency_us":{int(r.latency_us)},"log":{_log_json(r.tenant_id)},'
        f'"method":{s(r.method)},"occurred_at_ms":',
        f',"peer":{s(r.peer)}',
        f',"reason":{s(r.reason)},"replayed":{"true" if r.replayed else "false"},'
        f'"request_digest":{s(r.request_digest)},"request_id":{s(r.request_id)},"resource":',
        ',"session_id":',
        f',"subject":{s(r.subject)},"subject_type":{s(r.subject_type)},'
        f'"time_ms":{int(r.time_ms)},"v":{FORMAT_VERSION}}}',
    )


def _fill(segments: tuple[str, ...], r: Record, index: int) -> bytes:
    """The body: the segments with the per-entry fields between them."""
    s = _string
    a, b, c, d, e, f, g, h, i = segments
    values = r.attributes
    attributes = ",".join([f"{s(k)}:{s(values[k])}" for k in sorted(values)]) if values else ""
    personal = (
        f',"personal":{{"ciphertext":{s(r.personal)},"subject":{s(r.data_subject)}}}'
        if r.data_subject
        else ""
    )
    return (
        f"{a}{attributes}{b}{s(r.code)}{c}{s(r.event_type)}{d}{int(index)}{e}"
        f"{int(r.occurred_at_ms)}{f}{personal}{g}{s(r.resource)}{h}{s(r.session_id)}{i}"
    ).encode()


_string = json.encoder.encode_basestring_ascii


@functools.lru_cache(maxsize=4096)
def _log_json(tenant_id: str) -> str:
    return str(_string(log_id(tenant_id)))


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


@dataclass(slots=True)
class EventInput:
    """One event as an agent runtime reports it (validated by `AuditLog.append_events`); not
    frozen for the same reason as `Record`, and never changed either."""

    event_type: str
    resource: str = ""
    code: str = ""
    session_id: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    occurred_at_ms: int = 0
    data_subject: str = ""
    personal_data: Mapping[str, str] = field(default_factory=dict)
