"""PgAuditStore: the audit log in PostgreSQL — the only place audit SQL lives.

Appends run in one transaction per batch. For each tenant in the batch (in sorted order, so
two processes never wait on each other in a cycle) the writer takes a transaction-scoped
advisory lock on that tenant's log, reads the log's size, assigns the next indexes, and inserts
the entries, every perfect-subtree node they complete (`merkle.completed_nodes`) and the new
size. The lock makes the writers of all server processes take turns per tenant, so the tree
is one consistent sequence; it is released by the commit.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import asyncpg

from server.audit import merkle
from server.audit.model import EntryFilter, Record, StoredEntry, encode, log_id
from server.db import Database

_LOCK_CLASS = 0x61756474  # "audt": the first key of every audit advisory lock
_UTC = dt.UTC

_SET_SIZE = """
INSERT INTO audit_logs (tenant_id, size) VALUES ($1, $2)
ON CONFLICT (tenant_id) DO UPDATE SET size = EXCLUDED.size, updated_at = now()
"""
_NODES = """
SELECT n.level, n.idx, n.hash FROM audit_nodes n
JOIN unnest($2::smallint[], $3::bigint[]) AS w(level, idx) ON n.level = w.level AND n.idx = w.idx
WHERE n.tenant_id = $1
"""
_ENTRY_COLUMNS = """
SELECT e.idx, e.body, n.hash FROM audit_entries e
JOIN audit_nodes n ON n.tenant_id = e.tenant_id AND n.level = 0 AND n.idx = e.idx
"""


def _time(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, _UTC)


def _column(value: str) -> str:
    """PostgreSQL text cannot hold NUL; the body (JSON-escaped) keeps the exact value."""
    return value.replace("\x00", "\ufffd")


class PgAuditStore:
    """See the module docstring."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def append(self, groups: Mapping[str, Sequence[Record]]) -> dict[str, int]:
        """Append each tenant's records; returns the index of each tenant's first record."""
        firsts: dict[str, int] = {}
        async with self._db.transaction() as conn:
            for tenant_id in sorted(groups):
                firsts[tenant_id] = await self._append(conn, tenant_id, groups[tenant_id])
        return firsts

    async def _append(
        self, conn: asyncpg.Connection, tenant_id: str, records: Sequence[Record]
    ) -> int:
        await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _LOCK_CLASS, tenant_id)
        size = await conn.fetchval("SELECT size FROM audit_logs WHERE tenant_id = $1", tenant_id)
        size = size or 0
        bodies = [encode(record, size + i) for i, record in enumerate(records)]
        edge = await self._fetch_nodes(conn, tenant_id, _edge(size))
        nodes = merkle.completed_nodes(
            size, [merkle.leaf_hash(b) for b in bodies], lambda lv, ix: edge[(lv, ix)]
        )
        await conn.copy_records_to_table(
            "audit_entries", records=_entry_rows(tenant_id, records, size, bodies), columns=_COLUMNS
        )
        await conn.copy_records_to_table(
            "audit_nodes",
            records=[(tenant_id, *node) for node in nodes],
            columns=("tenant_id", "level", "idx", "hash"),
        )
        await conn.execute(_SET_SIZE, tenant_id, size + len(records))
        return int(size)

    async def size(self, tenant_id: str) -> int:
        async with self._db.acquire() as conn:
            size = await conn.fetchval(
                "SELECT size FROM audit_logs WHERE tenant_id = $1", tenant_id
            )
        return int(size or 0)

    async def nodes(
        self, tenant_id: str, wanted: Collection[tuple[int, int]]
    ) -> dict[tuple[int, int], bytes]:
        async with self._db.acquire() as conn:
            return await self._fetch_nodes(conn, tenant_id, wanted)

    @staticmethod
    async def _fetch_nodes(
        conn: asyncpg.Connection, tenant_id: str, wanted: Collection[tuple[int, int]]
    ) -> dict[tuple[int, int], bytes]:
        if not wanted:
            return {}
        rows = await conn.fetch(_NODES, tenant_id, [w[0] for w in wanted], [w[1] for w in wanted])
        return {(r["level"], r["idx"]): bytes(r["hash"]) for r in rows}

    async def entries(
        self, tenant_id: str, where: EntryFilter, after: int, limit: int
    ) -> list[StoredEntry]:
        clauses, args = _filter_clauses(where, [tenant_id, after])
        query = (
            f"{_ENTRY_COLUMNS} WHERE e.tenant_id = $1 AND e.idx > $2 {clauses}"
            f" ORDER BY e.idx LIMIT {int(limit)}"
        )
        async with self._db.acquire() as conn:
            rows = await conn.fetch(query, *args)
        return [_stored(r) for r in rows]

    async def range(self, tenant_id: str, start: int, end: int) -> list[StoredEntry]:
        """Entries with `start <= index < end` that exist (a deleted row is simply absent)."""
        query = f"{_ENTRY_COLUMNS} WHERE e.tenant_id = $1 AND e.idx >= $2 AND e.idx < $3"
        async with self._db.acquire() as conn:
            rows = await conn.fetch(query + " ORDER BY e.idx", tenant_id, start, end)
        return [_stored(r) for r in rows]

    async def latest_checkpoint(self, tenant_id: str) -> merkle.SignedCheckpoint | None:
        async with self._db.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT size, root, timestamp_ms, key_id, signature FROM audit_checkpoints"
                " WHERE tenant_id = $1 ORDER BY size DESC LIMIT 1",
                tenant_id,
            )
        if row is None:
            return None
        checkpoint = merkle.Checkpoint(
            log_id(tenant_id), row["size"], bytes(row["root"]), row["timestamp_ms"]
        )
        return merkle.SignedCheckpoint(checkpoint, row["key_id"], bytes(row["signature"]))

    async def save_checkpoint(self, tenant_id: str, signed: merkle.SignedCheckpoint) -> None:
        """Store a checkpoint; one already stored for the same size (another process) wins."""
        cp = signed.checkpoint
        async with self._db.acquire() as conn:
            await conn.execute(
                "INSERT INTO audit_checkpoints"
                " (tenant_id, size, root, timestamp_ms, key_id, signature)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                tenant_id,
                cp.size,
                cp.root,
                cp.timestamp_ms,
                signed.key_id,
                signed.signature,
            )

    async def stale_logs(self) -> list[str]:
        """Tenants whose log grew since its latest checkpoint."""
        async with self._db.acquire() as conn:
            rows = await conn.fetch(
                "SELECT l.tenant_id FROM audit_logs l WHERE l.size > COALESCE("
                " (SELECT max(c.size) FROM audit_checkpoints c WHERE c.tenant_id = l.tenant_id),"
                " 0)"
            )
        return [r["tenant_id"] for r in rows]

    async def expire(self, before_ms: int) -> int:
        """Remove bodies (and personal filter columns) of entries recorded before the cut-off."""
        async with self._db.acquire() as conn:
            status = await conn.execute(
                "UPDATE audit_entries SET body = NULL, subject = '', actor = '',"
                " session_id = '', resource = '' WHERE recorded_at < $1 AND body IS NOT NULL",
                _time(before_ms),
            )
        return int(status.split()[-1])


def _edge(size: int) -> list[tuple[int, int]]:
    """The perfect subtrees of a tree of `size` leaves (its binary decomposition)."""
    found, start = [], 0
    while size:
        level = size.bit_length() - 1
        found.append((level, start >> level))
        start, size = start + (1 << level), size - (1 << level)
    return found


_COLUMNS = (
    "tenant_id",
    "idx",
    "recorded_at",
    "kind",
    "method",
    "code",
    "subject",
    "actor",
    "session_id",
    "resource",
    "body",
)


def _entry_rows(
    tenant_id: str, records: Sequence[Record], size: int, bodies: Sequence[bytes]
) -> list[tuple[Any, ...]]:
    return [
        (
            tenant_id,
            size + i,
            _time(r.time_ms),
            r.kind,
            _column(r.method),
            _column(r.code),
            _column(r.subject),
            _column(r.actor),
            _column(r.session_id),
            _column(r.resource),
            body.decode(),
        )
        for i, (r, body) in enumerate(zip(records, bodies, strict=True))
    ]


_FILTER_COLUMNS = ("subject", "actor", "session_id", "method", "code", "resource", "kind")


def _filter_clauses(where: EntryFilter, args: list[Any]) -> tuple[str, list[Any]]:
    clauses = []
    if where.start_ms is not None:
        args.append(_time(where.start_ms))
        clauses.append(f"e.recorded_at >= ${len(args)}")
    if where.end_ms is not None:
        args.append(_time(where.end_ms))
        clauses.append(f"e.recorded_at < ${len(args)}")
    for column in _FILTER_COLUMNS:
        value = getattr(where, column)
        if value:
            args.append(_column(value))
            clauses.append(f"e.{column} = ${len(args)}")
    return "".join(f" AND {c}" for c in clauses), args


def _stored(row: asyncpg.Record) -> StoredEntry:
    return StoredEntry(row["idx"], bytes(row["hash"]), row["body"])
