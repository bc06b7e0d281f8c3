"""PgAuditStore: the audit log in PostgreSQL — the only place audit SQL lives.

Appends run in one transaction per batch. For each tenant in the batch (in sorted order, so
two processes never wait on each other in a cycle) the writer takes a transaction-scoped
advisory lock on that tenant's log, reads the log's size, assigns the next indexes, and inserts
the entries, every perfect-subtree node they complete (`merkle.completed_nodes`) and the new
size. The lock makes the writers of all server processes take turns per tenant, so the tree
is one consistent sequence; it is released by the commit. When this process appended to a
log last it knows the log's size and right edge, so a one-tenant batch is hashed ahead and sent
as one call of the SQL function `audit_append` (migration 0009), which takes the same lock and
appends only if the size is still the one hashed against: one round trip instead of nine.
While such a call is unanswered the writer may already send the log's next batch (it pipelines
group commits), hashed against the log as the first will leave it; the function (migration
0010) appends it only if the log ends with exactly that first batch, else it is 'moved' and
takes the locked path, which waits for the lock and reads the real size and edge.

Appends are idempotent per batch: the first entry of each tenant's part carries the batch's
random id (`audit_entries.batch`, unique per tenant), and under the lock the writer first looks
for it. A retry of a batch whose COMMIT went through although its answer was lost finds it and
returns its indexes instead of appending the entries again. Errors are sorted here, where the
driver is known: a batch refused for its content (a constraint, a value PostgreSQL cannot
hold, a value the driver cannot encode: `_REFUSED`) raises `BatchRejected`; everything else
(connection lost, a read-only standby, missing privileges, timeouts) is left to the writer's
retry.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from server.audit import merkle
from server.audit.model import (
    BatchRejected,
    EntryFilter,
    Record,
    Settings,
    StoredEntry,
    encode_all,
    log_id,
)
from server.db import Database

_LOCK_CLASS = 0x61756474  # "audt": the first key of every audit advisory lock
_UTC = dt.UTC

_SET_SIZE = """
INSERT INTO audit_logs (tenant_id, size) VALUES ($1, $2)
ON CONFLICT (tenant_id) DO UPDATE SET size = EXCLUDED.size, updated_at = now()
"""
# Read after the lock is held (a statement of its own, so its snapshot sees every commit made
# before the lock was granted).
_SIZE_AND_BATCH = """
SELECT (SELECT size FROM audit_logs WHERE tenant_id = $1),
       (SELECT idx FROM audit_entries WHERE tenant_id = $1 AND batch = $2)
"""
# What is refused for a batch's content: by PostgreSQL (a value it cannot hold, a constraint,
# a row too large) or before it is sent (a value the driver or the encoding cannot take; the
# driver's own DataError is a ValueError). Everything else — connection lost, a read-only
# standby after a failover, missing privileges or functions, timeouts — says nothing about the
# batch: the writer retries it.
_REFUSED = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    ValueError,
    TypeError,
)
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


@dataclass(slots=True)
class _Ahead:
    """A sent, unanswered one-round-trip append: its batch id, the index its entries start at,
    the log's size and right edge once it is appended, and — once answered — whether it was."""

    batch: bytes
    first: int
    size: int
    edge: dict[tuple[int, int], bytes]
    sent: asyncio.Event = field(default_factory=asyncio.Event)  # its current attempt is out
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    appended: bool = False


class PgAuditStore:
    """See the module docstring."""

    def __init__(self, db: Database) -> None:
        self._db = db
        # The perfect subtrees at the right edge of each log this process wrote last, by size:
        # reused when the log still has that size (no other process appended since).
        self._edges: dict[str, tuple[int, dict[tuple[int, int], bytes]]] = {}
        # The newest one-round-trip append of each log that is sent and not yet answered: the
        # next batch is hashed against the log as it will leave it (see `_append_known`).
        self._ahead: dict[str, _Ahead] = {}
        # Logs with locked-path appends in flight (each event set when its append ends): a
        # one-round-trip append waits for them rather than hash against a size they change.
        self._locked: dict[str, set[asyncio.Event]] = {}

    async def append(self, groups: Mapping[str, Sequence[Record]], batch: bytes) -> dict[str, int]:
        """Append each tenant's records as batch `batch`; returns the index of each tenant's
        first record. Appending a batch that is already stored returns its indexes."""
        try:
            if len(groups) == 1:
                ((tenant_id, records),) = groups.items()
                first = await self._append_known(tenant_id, records, batch)
                if first is not None:
                    return {tenant_id: first}
            return await self._append_locked(groups, batch)
        except _REFUSED as exc:
            raise BatchRejected(type(exc).__name__) from exc

    async def _append_known(
        self, tenant_id: str, records: Sequence[Record], batch: bytes
    ) -> int | None:
        """One tenant's batch in one round trip (`audit_append`, migrations 0009 and 0010) when
        this process knows the log's size and right edge: from its own last append, or — when
        that append is still unanswered (the writer pipelines) — as that append will leave the
        log, which the function checks by its batch id. A pipelined batch that reached the
        lock before its predecessor is sent again once the predecessor is appended. None when
        this process knows neither, or the log is not as expected (the locked path then reads
        it)."""
        while (prev := self._ahead.get(tenant_id)) is None and tenant_id in self._locked:
            # A locked append of this log still running here: it will know the log's size
            # and edge (the loop waits for each of them in turn).
            await next(iter(self._locked[tenant_id])).wait()
        if prev is not None:
            size, edge = prev.size, prev.edge
        elif (cached := self._edges.get(tenant_id)) is not None:
            size, edge = cached
        else:
            return None
        bodies = encode_all(records, size)
        nodes = merkle.completed_nodes(
            size, [merkle.leaf_hash(b) for b in bodies], lambda lv, ix: edge[(lv, ix)]
        )
        rows = _entry_rows(tenant_id, records, size, bodies, batch)
        new_size = size + len(records)
        mine = _Ahead(batch, size, new_size, _new_edge(edge, nodes, new_size))
        self._ahead[tenant_id] = mine
        args = (
            tenant_id,
            size,
            batch,
            *_append_arrays(rows, nodes),
            None if prev is None else prev.batch,
            None if prev is None else prev.first,
        )
        try:
            if prev is not None:
                await prev.sent.wait()  # the lock is taken in the order the calls are sent
            outcome, value = await self._call_append(args, mine.sent)
            if outcome == "moved" and prev is not None:
                mine.sent.clear()  # whoever is hashed against this one waits for its resend
                await prev.answered.wait()
                if prev.appended:  # the log is now as hashed against, unless moved again
                    outcome, value = await self._call_append(args, mine.sent)
            if outcome == "appended":
                mine.appended = True
                self._remember(tenant_id, new_size, mine.edge)
        finally:
            mine.sent.set()
            mine.answered.set()
            if self._ahead.get(tenant_id) is mine:
                del self._ahead[tenant_id]
        return None if outcome == "moved" else int(value)

    async def _call_append(self, args: Sequence[Any], sent: asyncio.Event) -> tuple[str, int]:
        async with self._db.acquire() as conn:
            # Set before the call, which writes its request before it first waits: a batch
            # hashed against this one is sent after it.
            sent.set()
            outcome, value = await conn.fetchrow(_APPEND_KNOWN, *args)
        return str(outcome), int(value)

    def _remember(self, tenant_id: str, size: int, edge: dict[tuple[int, int], bytes]) -> None:
        """Keep a committed log's right edge, unless a later one is already known (answers
        of pipelined batches may be handled out of order)."""
        known = self._edges.get(tenant_id)
        if known is None or known[0] < size:
            self._edges[tenant_id] = (size, edge)

    async def _append_locked(
        self, groups: Mapping[str, Sequence[Record]], batch: bytes
    ) -> dict[str, int]:
        """Every tenant's part in one transaction, reading each log's size under its lock."""
        firsts: dict[str, int] = {}
        edges: dict[str, tuple[int, dict[tuple[int, int], bytes]]] = {}
        busy = asyncio.Event()
        for tenant_id in groups:
            self._locked.setdefault(tenant_id, set()).add(busy)
        try:
            async with self._db.transaction() as conn:
                for tenant_id in sorted(groups):
                    firsts[tenant_id], edge = await self._append(
                        conn, tenant_id, groups[tenant_id], batch
                    )
                    if edge is not None:
                        edges[tenant_id] = edge
        finally:
            for tenant_id in groups:
                running = self._locked[tenant_id]
                running.discard(busy)
                if not running:
                    del self._locked[tenant_id]
            busy.set()
        for tenant_id, (new_size, new_edge) in edges.items():  # only once committed
            self._remember(tenant_id, new_size, new_edge)
        return firsts

    async def _append(
        self, conn: asyncpg.Connection, tenant_id: str, records: Sequence[Record], batch: bytes
    ) -> tuple[int, tuple[int, dict[tuple[int, int], bytes]] | None]:
        await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _LOCK_CLASS, tenant_id)
        size, stored = await conn.fetchrow(_SIZE_AND_BATCH, tenant_id, batch)
        if stored is not None:  # committed by an earlier attempt whose answer was lost
            return int(stored), None
        size = size or 0
        bodies = encode_all(records, size)
        cached = self._edges.get(tenant_id)
        if cached is not None and cached[0] == size:
            edge = cached[1]
        else:
            edge = await self._fetch_nodes(conn, tenant_id, _edge(size))
        nodes = merkle.completed_nodes(
            size, [merkle.leaf_hash(b) for b in bodies], lambda lv, ix: edge[(lv, ix)]
        )
        await conn.copy_records_to_table(
            "audit_entries",
            records=_entry_rows(tenant_id, records, size, bodies, batch),
            columns=_COLUMNS,
        )
        await conn.copy_records_to_table(
            "audit_nodes",
            records=[(tenant_id, level, index, value) for level, index, value in nodes],
            columns=("tenant_id", "level", "idx", "hash"),
        )
        new_size = size + len(records)
        await conn.execute(_SET_SIZE, tenant_id, new_size)
        return int(size), (new_size, _new_edge(edge, nodes, new_size))

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

    async def expire(self, now_ms: int, default_days: int) -> int:
        """Retention: remove the bodies (and personal filter columns) at the start of each log
        that are older than its tenant's retention (`audit_settings`, else `default_days`).

        Only a prefix is ever removed: a log's expiry stops at its first entry still within
        retention, even if a later entry is older (entries of several processes are not
        strictly in time order), so bodiless entries always precede every entry with a body.
        A system-wide background job: it visits every tenant's log."""
        async with self._db.acquire() as conn:
            logs = await conn.fetch(_RETENTION, default_days)
        removed = 0
        for log in logs:
            cutoff = _time(now_ms) - dt.timedelta(days=log["days"])
            removed += await self._expire_log(log["tenant_id"], log["expired"], cutoff)
        return removed

    async def _expire_log(self, tenant_id: str, start: int, cutoff: dt.datetime) -> int:
        async with self._db.acquire() as conn:
            end = await conn.fetchval(_EXPIRY_END, tenant_id, start, cutoff)
        removed = 0
        for low in range(start, end, _EXPIRE_CHUNK):
            high = min(low + _EXPIRE_CHUNK, end)
            async with self._db.transaction() as conn:
                status = await conn.execute(_EXPIRE_BODIES, tenant_id, low, high)
                await conn.execute(_EXPIRED_UP_TO, tenant_id, high)
            removed += int(status.split()[-1])
        return removed

    # --- data subjects ----------------------------------------------------------------------

    async def subject_ref(self, tenant_id: str, subject_mac: bytes, *, create: bool) -> str | None:
        """The reference of a (not erased) data subject, created with a random one if asked."""
        async with self._db.acquire() as conn:
            ref = await conn.fetchval(_SUBJECT_REF, tenant_id, subject_mac)
            if ref is not None or not create:
                return str(ref) if ref is not None else None
            ref = await conn.fetchval(
                "INSERT INTO audit_subjects (tenant_id, ref, subject_mac) VALUES ($1, $2, $3)"
                " ON CONFLICT (tenant_id, subject_mac) WHERE subject_mac IS NOT NULL DO NOTHING"
                " RETURNING ref",
                tenant_id,
                secrets.token_hex(16),
                subject_mac,
            )
            if ref is None:  # another writer created it first
                ref = await conn.fetchval(_SUBJECT_REF, tenant_id, subject_mac)
        return str(ref)

    async def forget_subject(self, tenant_id: str, ref: str, now_ms: int) -> int:
        """Unlink an erased subject from its reference; returns its entries' count."""
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE audit_subjects SET subject_mac = NULL, erased_at = $3"
                " WHERE tenant_id = $1 AND ref = $2 AND erased_at IS NULL",
                tenant_id,
                ref,
                _time(now_ms),
            )
            count = await conn.fetchval(
                "SELECT count(*) FROM audit_entries WHERE tenant_id = $1 AND data_subject = $2",
                tenant_id,
                ref,
            )
        return int(count)

    async def subject_entries(
        self, tenant_id: str, ref: str | None, principal: str, after: int, limit: int
    ) -> list[tuple[StoredEntry, str]]:
        """Entries whose personal data is `ref`'s, or where `principal` is the subject or in the
        delegation chain, in index order after `after`; with each entry's data-subject
        reference."""
        query = (
            "SELECT e.idx, e.body, n.hash, e.data_subject FROM audit_entries e"
            " JOIN audit_nodes n ON n.tenant_id = e.tenant_id AND n.level = 0 AND n.idx = e.idx"
            " WHERE e.tenant_id = $1 AND e.idx > $4 AND (e.data_subject = $2 OR e.subject = $3"
            " OR (e.actors <> '{}' AND e.actors @> ARRAY[$3])) ORDER BY e.idx LIMIT $5"
        )
        async with self._db.acquire() as conn:
            rows = await conn.fetch(query, tenant_id, ref or "-", principal, after, limit)
        return [(_stored(r), r["data_subject"]) for r in rows]

    # --- settings ---------------------------------------------------------------------------

    async def settings(self, tenant_id: str) -> Settings | None:
        async with self._db.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT retention_days, revision FROM audit_settings WHERE tenant_id = $1",
                tenant_id,
            )
        return None if row is None else Settings(row["retention_days"], row["revision"])

    async def put_settings(
        self, tenant_id: str, retention_days: int, expected_revision: int | None
    ) -> Settings | None:
        """Write the settings; None when `expected_revision` (0: no row yet) is not current."""
        async with self._db.transaction() as conn:
            current = await conn.fetchval(
                "SELECT revision FROM audit_settings WHERE tenant_id = $1 FOR UPDATE", tenant_id
            )
            if expected_revision is not None and expected_revision != (current or 0):
                return None
            row = await conn.fetchrow(
                "INSERT INTO audit_settings (tenant_id, retention_days) VALUES ($1, $2)"
                " ON CONFLICT (tenant_id) DO UPDATE SET retention_days = EXCLUDED.retention_days,"
                " revision = audit_settings.revision + 1, updated_at = now()"
                " RETURNING retention_days, revision",
                tenant_id,
                retention_days,
            )
        return Settings(row["retention_days"], row["revision"])


_RETENTION = """
SELECT l.tenant_id, l.expired, COALESCE(s.retention_days, $1) AS days
FROM audit_logs l LEFT JOIN audit_settings s ON s.tenant_id = l.tenant_id
"""
# Where a log's expired prefix ends: its first entry (from `start`, in index order) still within
# retention, else the end of the log (both read in one snapshot, so an entry appended meanwhile
# lies beyond it).
_EXPIRY_END = """
SELECT COALESCE(
    (SELECT idx FROM audit_entries WHERE tenant_id = $1 AND idx >= $2 AND recorded_at >= $3
     ORDER BY idx LIMIT 1),
    (SELECT max(idx) + 1 FROM audit_entries WHERE tenant_id = $1 AND idx >= $2),
    $2)
"""
_EXPIRE_BODIES = """
UPDATE audit_entries SET body = NULL, subject = '', actor = '', session_id = '', resource = '',
    data_subject = '', actors = '{}'
WHERE tenant_id = $1 AND idx >= $2 AND idx < $3 AND body IS NOT NULL
"""
_EXPIRED_UP_TO = "UPDATE audit_logs SET expired = GREATEST(expired, $2) WHERE tenant_id = $1"
_EXPIRE_CHUNK = 10_000

_SUBJECT_REF = (
    "SELECT ref FROM audit_subjects WHERE tenant_id = $1 AND subject_mac = $2 AND erased_at IS NULL"
)


def _new_edge(
    edge: Mapping[tuple[int, int], bytes], nodes: Sequence[merkle.StoredNode], size: int
) -> dict[tuple[int, int], bytes]:
    """The right-edge subtrees after an append: from the old edge or the nodes it completed."""
    wanted = _edge(size)
    found = {place: edge[place] for place in wanted if place in edge}
    if len(found) < len(wanted):
        missing = set(wanted) - found.keys()
        found.update(((lv, ix), h) for lv, ix, h in nodes if (lv, ix) in missing)
    return found


def _edge(size: int) -> list[tuple[int, int]]:
    """The perfect subtrees of a tree of `size` leaves (its binary decomposition)."""
    found, start = [], 0
    while size:
        level = size.bit_length() - 1
        found.append((level, start >> level))
        start, size = start + (1 << level), size - (1 << level)
    return found


_APPEND_KNOWN = (
    "SELECT outcome, value FROM audit_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
    " $13, $14, $15, $16, $17, $18, $19)"
)


def _append_arrays(
    rows: Sequence[tuple[Any, ...]], nodes: Sequence[merkle.StoredNode]
) -> list[list[Any]]:
    """`audit_append`'s column arrays: the entry rows' columns from recorded_at to body (the
    batch id is its own argument), each row's delegation chain as a JSON array, and the
    nodes' levels, indexes and hashes."""
    columns = [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * 14
    actors = [json.dumps(chain) for chain in columns[13]]
    return [
        *columns[2:12],
        actors,
        [level for level, _, _ in nodes],
        [index for _, index, _ in nodes],
        [value for _, _, value in nodes],
    ]


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
    "data_subject",
    "body",
    "batch",
    "actors",
)


def _entry_rows(
    tenant_id: str, records: Sequence[Record], size: int, bodies: Sequence[bytes], batch: bytes
) -> list[tuple[Any, ...]]:
    """The COPY rows of a batch: the first carries the batch id. Entries of one call share one
    time, converted once."""
    times: dict[int, dt.datetime] = {}
    rows = []
    for i, (r, body) in enumerate(zip(records, bodies, strict=True)):
        at = times.get(r.time_ms)
        if at is None:
            at = times[r.time_ms] = _time(r.time_ms)
        text = body.decode()
        first = batch if i == 0 else None
        if "\\u0000" in text:  # a field holds NUL (escaped in the body), which text cannot
            rows.append(_nul_row(tenant_id, size + i, at, r, text, first))
            continue
        rows.append(
            (
                tenant_id,
                size + i,
                at,
                r.kind,
                r.method,
                r.code,
                r.subject,
                r.actors[0] if r.actors else r.subject,
                r.session_id,
                r.resource,
                r.data_subject,
                text,
                first,
                r.actors,
            )
        )
    return rows


def _nul_row(
    tenant_id: str, index: int, at: dt.datetime, r: Record, text: str, batch: bytes | None
) -> tuple[Any, ...]:
    columns = (r.method, r.code, r.subject, r.actor, r.session_id, r.resource)
    return (
        tenant_id,
        index,
        at,
        r.kind,
        *(_column(c) for c in columns),
        r.data_subject,
        text,
        batch,
        [_column(a) for a in r.actors],
    )


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
    if where.agent:  # the subject, or anywhere in the chain (`<> '{}'`: the partial index)
        args.append(_column(where.agent))
        n = len(args)
        clauses.append(f"(e.subject = ${n} OR (e.actors <> '{{}}' AND e.actors @> ARRAY[${n}]))")
    return "".join(f" AND {c}" for c in clauses), args


def _stored(row: asyncpg.Record) -> StoredEntry:
    return StoredEntry(row["idx"], bytes(row["hash"]), row["body"])
