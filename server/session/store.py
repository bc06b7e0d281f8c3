"""PostgreSQL store of the Session feature: agent sessions and their revisions, tasks, approvals.

Every state change is one conditional statement (`UPDATE … WHERE state = ANY(allowed)`), so
of two racing transitions exactly one matches a row and the other gets nothing back; the
service then reads the row to say why. Each session change also appends its snapshot to
`agent_session_events` in the same statement, so watchers can replay every revision.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg

from server.db import Database
from server.errors import InvalidArgument
from server.session.model import (
    LIVE_SESSION_STATES,
    AgentSession,
    Approval,
    ApprovalFilter,
    ApprovalState,
    NewApproval,
    NewSession,
    NewTask,
    SessionFilter,
    SessionState,
    Task,
    TaskState,
)

_TERMINAL = [s.value for s in SessionState if s.terminal]


def _ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _ts_or_none(value: float | None) -> datetime | None:
    return None if value is None else _ts(value)


def _epoch(value: Any) -> float | None:
    """A timestamptz from a row (datetime) or from a jsonb snapshot (ISO string)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return float(value.timestamp())


def _json(value: Any) -> dict[str, Any]:
    loaded = json.loads(value) if isinstance(value, str) else value
    return dict(loaded or {})


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return None


def _optional(value: Any) -> str | None:
    return None if value is None else str(value)


def session_from(row: Mapping[str, Any]) -> AgentSession:
    return AgentSession(
        id=str(row["id"]),
        tenant_id=row["tenant_id"],
        agent_id=row["agent_id"],
        user_id=row["user_id"],
        role=row["role"],
        parent_session_id=_optional(row["parent_session_id"]),
        task=row["task"],
        metadata=_json(row["metadata"]),
        labels=tuple(row["labels"]),
        state=SessionState(row["state"]),
        end_reason=row["end_reason"],
        created_by=row["created_by"],
        created_at=_epoch(row["created_at"]) or 0.0,
        updated_at=_epoch(row["updated_at"]) or 0.0,
        started_at=_epoch(row["started_at"]),
        ended_at=_epoch(row["ended_at"]),
        expires_at=_epoch(row["expires_at"]) or 0.0,
        revision=int(row["revision"]),
    )


def _task(row: Mapping[str, Any]) -> Task:
    return Task(
        id=str(row["id"]),
        tenant_id=row["tenant_id"],
        session_id=str(row["session_id"]),
        type=row["type"],
        from_role=row["from_role"],
        to_role=row["to_role"],
        payload=_json(row["payload"]),
        trace_id=row["trace_id"],
        state=TaskState(row["state"]),
        status_message=row["status_message"],
        created_by=row["created_by"],
        created_at=_epoch(row["created_at"]) or 0.0,
        updated_at=_epoch(row["updated_at"]) or 0.0,
        revision=int(row["revision"]),
    )


def _approval(row: Mapping[str, Any]) -> Approval:
    return Approval(
        id=str(row["id"]),
        tenant_id=row["tenant_id"],
        session_id=_optional(row["session_id"]),
        requester_id=row["requester_id"],
        requester_chain=tuple(row["requester_chain"]),
        action_digest=bytes(row["action_digest"]),
        action=row["action"],
        reason=row["reason"],
        approver_roles=tuple(row["approver_roles"]),
        state=ApprovalState(row["state"]),
        decided_by=row["decided_by"],
        decision_note=row["decision_note"],
        created_at=_epoch(row["created_at"]) or 0.0,
        decided_at=_epoch(row["decided_at"]),
        expires_at=_epoch(row["expires_at"]) or 0.0,
        redeemed_at=_epoch(row["redeemed_at"]),
        revision=int(row["revision"]),
    )


# A session change and its event row, in one statement. `{change}` is a data-modifying
# statement on agent_sessions ending in RETURNING *.
_WITH_EVENT = (
    "WITH s AS ({change}), e AS (INSERT INTO agent_session_events (session_id, revision, "
    "snapshot) SELECT id, revision, to_jsonb(s) FROM s) SELECT * FROM s"
)

_TRANSITION = _WITH_EVENT.format(
    change="UPDATE agent_sessions SET state = $3, updated_at = $4, end_reason = $5, "
    "started_at = CASE WHEN $3 = 'ACTIVE' THEN $4 ELSE started_at END, "
    "ended_at = CASE WHEN $3 = ANY($8::text[]) THEN $4 ELSE ended_at END, "
    "revision = revision + 1 WHERE tenant_id = $1 AND id = $2 AND state = ANY($6::text[]) "
    "AND ($7::bigint IS NULL OR revision = $7) "
    "AND (CASE WHEN $3 = 'EXPIRED' THEN expires_at <= $4 ELSE expires_at > $4 END) "
    "RETURNING *"
)


class UnstorableValue(InvalidArgument):
    default_message = "a request field holds a value that cannot be stored (e.g. a NUL character)"


class PgSessionStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection; values PostgreSQL refuses (NUL in text, NaN in jsonb) are the
        caller's bad input, never an internal error."""
        try:
            async with self._db.acquire() as conn:
                yield conn
        except asyncpg.DataError:
            raise UnstorableValue() from None

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._acquire() as conn, conn.transaction():
            yield conn

    # --- sessions ---------------------------------------------------------------------------

    async def create_session(self, new: NewSession) -> tuple[AgentSession, bool]:
        """The new session and True; or, if this request id already created one, that one and
        False (exactly once: the id is unique per tenant, stored in the same statement). One
        statement (the session and its first revision), so no explicit transaction: BEGIN and
        COMMIT would be two more round trips. ON CONFLICT waits for a racing insert of the same
        request id to commit, so the SELECT that follows a conflict finds its row."""
        insert = _WITH_EVENT.format(
            change="INSERT INTO agent_sessions (id, tenant_id, agent_id, user_id, role, "
            "parent_session_id, task, metadata, labels, state, created_by, created_at, "
            "updated_at, expires_at, request_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, "
            "'PENDING', $10, $11, $11, $12, $13) "
            "ON CONFLICT (tenant_id, request_id) DO NOTHING RETURNING *"
        )
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                insert,
                uuid.uuid4(),
                new.tenant_id,
                new.agent_id,
                new.user_id,
                new.role,
                _uuid(new.parent_session_id or ""),
                new.task,
                json.dumps(new.metadata),
                list(new.labels),
                new.created_by,
                _ts(new.created_at),
                _ts(new.expires_at),
                new.request_id,
            )
            if row is not None:
                return session_from(row), True
            row = await conn.fetchrow(
                "SELECT * FROM agent_sessions WHERE tenant_id = $1 AND request_id = $2",
                new.tenant_id,
                new.request_id,
            )
        assert row is not None
        return session_from(row), False

    async def session_by_request(self, tenant_id: str, request_id: str) -> AgentSession | None:
        """The session a CreateSession with this request id made, if any."""
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM agent_sessions WHERE tenant_id = $1 AND request_id = $2",
                tenant_id,
                request_id,
            )
        return None if row is None else session_from(row)

    async def session(self, tenant_id: str, session_id: str) -> AgentSession | None:
        key = _uuid(session_id)
        if key is None:
            return None
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM agent_sessions WHERE tenant_id = $1 AND id = $2", tenant_id, key
            )
        return None if row is None else session_from(row)

    async def transition(
        self,
        tenant_id: str,
        session_id: str,
        target: SessionState,
        allowed_from: Sequence[SessionState],
        now: float,
        reason: str,
        revision: int | None,
    ) -> AgentSession | None:
        """The session after the change; None if no row matched (gone, wrong state, stale
        revision, or expiry on the wrong side of `now`)."""
        key = _uuid(session_id)
        if key is None:
            return None
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                _TRANSITION,
                tenant_id,
                key,
                target.value,
                _ts(now),
                reason,
                [s.value for s in allowed_from],
                revision,
                _TERMINAL,
            )
        return None if row is None else session_from(row)

    async def update_session(
        self,
        tenant_id: str,
        session_id: str,
        now: float,
        *,
        metadata: dict[str, Any] | None,
        labels: Sequence[str] | None,
        revision: int | None,
    ) -> AgentSession | None:
        """Replace metadata and/or grow labels of a live session; labels are merged with the
        stored ones, so a concurrent AddSessionLabels is never undone. None if no row matched
        or nothing would change."""
        statement = _WITH_EVENT.format(
            change="UPDATE agent_sessions SET metadata = COALESCE($4::jsonb, metadata), "
            "labels = ARRAY(SELECT DISTINCT l FROM unnest(labels || $5::text[]) AS l ORDER BY l),"
            " updated_at = $3, revision = revision + 1 WHERE tenant_id = $1 AND id = $2 "
            "AND state = ANY($6::text[]) AND expires_at > $3 "
            "AND ($7::bigint IS NULL OR revision = $7) "
            "AND (($4::jsonb IS NOT NULL AND $4::jsonb IS DISTINCT FROM metadata) "
            "OR NOT (labels @> $5::text[])) RETURNING *"
        )
        key = _uuid(session_id)
        if key is None:
            return None
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                statement,
                tenant_id,
                key,
                _ts(now),
                None if metadata is None else json.dumps(metadata),
                list(labels or ()),
                list(LIVE_SESSION_STATES),
                revision,
            )
        return None if row is None else session_from(row)

    async def revisions(
        self, tenant_id: str, session_id: str, after: int, limit: int = 500
    ) -> list[AgentSession]:
        """The session's snapshots after revision `after`, in order."""
        key = _uuid(session_id)
        if key is None:
            return []
        async with self._acquire() as conn:
            rows = await conn.fetch(
                "SELECT e.snapshot FROM agent_session_events e JOIN agent_sessions s "
                "ON s.id = e.session_id WHERE s.tenant_id = $1 AND e.session_id = $2 "
                "AND e.revision > $3 ORDER BY e.revision LIMIT $4",
                tenant_id,
                key,
                after,
                limit,
            )
        return [session_from(json.loads(r["snapshot"])) for r in rows]

    async def list_sessions(
        self,
        tenant_id: str,
        where: SessionFilter,
        now: float,
        after: tuple[float, str] | None,
        limit: int,
    ) -> list[AgentSession]:
        """Newest first; `after` is the (created_at, id) of the previous page's last row. The
        state filter sees a live session past its expiry as EXPIRED, as reads do."""
        async with self._acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM agent_sessions WHERE tenant_id = $1 "
                "AND ($2::text IS NULL OR (CASE WHEN state = ANY($10::text[]) "
                "AND expires_at <= $11 THEN 'EXPIRED' ELSE state END) = $2) "
                "AND ($3 = '' OR agent_id = $3) "
                "AND ($4 = '' OR user_id = $4) "
                "AND ($5::timestamptz IS NULL OR created_at >= $5) "
                "AND ($6::timestamptz IS NULL OR created_at < $6) "
                "AND ($7::timestamptz IS NULL OR (created_at, id) < ($7, $8::uuid)) "
                "ORDER BY created_at DESC, id DESC LIMIT $9",
                tenant_id,
                None if where.state is None else where.state.value,
                where.agent_id,
                where.user_id,
                _ts_or_none(where.created_after),
                _ts_or_none(where.created_before),
                None if after is None else _ts(after[0]),
                None if after is None else _uuid(after[1]),
                limit,
                list(LIVE_SESSION_STATES),
                _ts(now),
            )
        return [session_from(r) for r in rows]

    async def expire_due(self, now: float, limit: int) -> list[AgentSession]:
        """Expire up to `limit` live sessions past their expiry (the sweeper); concurrent
        sweepers in other processes skip each other's rows."""
        statement = _WITH_EVENT.format(
            change="UPDATE agent_sessions SET state = 'EXPIRED', updated_at = $1, ended_at = $1,"
            " revision = revision + 1 WHERE id IN (SELECT id FROM agent_sessions WHERE state = "
            "ANY($3::text[]) AND expires_at <= $1 ORDER BY expires_at LIMIT $2 "
            "FOR UPDATE SKIP LOCKED) AND state = ANY($3::text[]) RETURNING *"
        )
        async with self._acquire() as conn:
            rows = await conn.fetch(statement, _ts(now), limit, list(LIVE_SESSION_STATES))
        return [session_from(r) for r in rows]

    async def unrevoked(self, limit: int) -> list[tuple[str, str]]:
        """(tenant, id) of ended sessions whose delegated tokens are not yet on the deny-list,
        in every tenant (the sweeper's system-wide job)."""
        async with self._acquire() as conn:
            rows = await conn.fetch(
                "SELECT tenant_id, id FROM agent_sessions WHERE ended_at IS NOT NULL "
                "AND tokens_revoked_at IS NULL ORDER BY ended_at LIMIT $1",
                limit,
            )
        return [(r["tenant_id"], str(r["id"])) for r in rows]

    async def mark_revoked(self, session_ids: Sequence[str], now: float) -> None:
        async with self._acquire() as conn:
            await conn.execute(
                "UPDATE agent_sessions SET tokens_revoked_at = $2 WHERE id = ANY($1::uuid[])",
                [uuid.UUID(s) for s in session_ids],
                _ts(now),
            )

    async def purge(self, ended_before: float, limit: int) -> int:
        """Delete sessions (with their events, tasks and approvals) that ended before the
        cutoff, and decided or expired approvals without a session; the number removed."""
        cutoff = _ts(ended_before)
        async with self._transaction() as conn:
            sessions = await conn.fetch(
                "DELETE FROM agent_sessions WHERE id IN (SELECT id FROM agent_sessions "
                "WHERE ended_at < $1 AND tokens_revoked_at IS NOT NULL LIMIT $2) RETURNING id",
                cutoff,
                limit,
            )
            approvals = await conn.fetch(
                "DELETE FROM session_approvals WHERE id IN (SELECT id FROM session_approvals "
                "WHERE session_id IS NULL AND state <> 'PENDING' "
                "AND COALESCE(decided_at, expires_at) < $1 LIMIT $2) RETURNING id",
                cutoff,
                limit,
            )
        return len(sessions) + len(approvals)

    # --- tasks ------------------------------------------------------------------------------

    async def create_task(self, new: NewTask) -> tuple[Task, bool]:
        # One statement, no explicit transaction (see create_session).
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                "INSERT INTO session_tasks (id, tenant_id, session_id, type, from_role, to_role,"
                " payload, trace_id, state, created_by, created_at, updated_at, request_id) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'PENDING', $9, $10, $10, $11) "
                "ON CONFLICT (tenant_id, request_id) DO NOTHING RETURNING *",
                uuid.uuid4(),
                new.tenant_id,
                uuid.UUID(new.session_id),
                new.type,
                new.from_role,
                new.to_role,
                json.dumps(new.payload),
                new.trace_id,
                new.created_by,
                _ts(new.created_at),
                new.request_id,
            )
            if row is not None:
                return _task(row), True
            row = await conn.fetchrow(
                "SELECT * FROM session_tasks WHERE tenant_id = $1 AND request_id = $2",
                new.tenant_id,
                new.request_id,
            )
        assert row is not None
        return _task(row), False

    async def task_by_request(self, tenant_id: str, request_id: str) -> Task | None:
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM session_tasks WHERE tenant_id = $1 AND request_id = $2",
                tenant_id,
                request_id,
            )
        return None if row is None else _task(row)

    async def task(self, tenant_id: str, task_id: str) -> Task | None:
        key = _uuid(task_id)
        if key is None:
            return None
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM session_tasks WHERE tenant_id = $1 AND id = $2", tenant_id, key
            )
        return None if row is None else _task(row)

    async def list_tasks(
        self,
        tenant_id: str,
        session_id: str,
        state: TaskState | None,
        to_role: str,
        after: tuple[float, str] | None,
        limit: int,
    ) -> list[Task]:
        async with self._acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM session_tasks WHERE tenant_id = $1 AND session_id = $2 "
                "AND ($3::text IS NULL OR state = $3) AND ($4 = '' OR to_role = $4) "
                "AND ($5::timestamptz IS NULL OR (created_at, id) > ($5, $6::uuid)) "
                "ORDER BY created_at, id LIMIT $7",
                tenant_id,
                uuid.UUID(session_id),
                None if state is None else state.value,
                to_role,
                None if after is None else _ts(after[0]),
                None if after is None else _uuid(after[1]),
                limit,
            )
        return [_task(r) for r in rows]

    async def transition_task(
        self,
        tenant_id: str,
        task_id: str,
        target: TaskState,
        allowed_from: Sequence[TaskState],
        message: str,
        now: float,
        revision: int | None,
    ) -> Task | None:
        key = _uuid(task_id)
        if key is None:
            return None
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                "UPDATE session_tasks SET state = $3, status_message = $4, updated_at = $5, "
                "revision = revision + 1 WHERE tenant_id = $1 AND id = $2 "
                "AND state = ANY($6::text[]) AND ($7::bigint IS NULL OR revision = $7) "
                "RETURNING *",
                tenant_id,
                key,
                target.value,
                message,
                _ts(now),
                [s.value for s in allowed_from],
                revision,
            )
        return None if row is None else _task(row)

    # --- approvals --------------------------------------------------------------------------

    async def create_approval(self, new: NewApproval) -> tuple[Approval, bool]:
        # One statement, no explicit transaction (see create_session).
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                "INSERT INTO session_approvals (id, tenant_id, session_id, requester_id, "
                "requester_chain, action_digest, action, reason, approver_roles, state, "
                "created_at, expires_at, request_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, "
                "$9, 'PENDING', $10, $11, $12) "
                "ON CONFLICT (tenant_id, request_id) DO NOTHING RETURNING *",
                uuid.uuid4(),
                new.tenant_id,
                _uuid(new.session_id or ""),
                new.requester_id,
                list(new.requester_chain),
                new.action_digest,
                new.action,
                new.reason,
                list(new.approver_roles),
                _ts(new.created_at),
                _ts(new.expires_at),
                new.request_id,
            )
            if row is not None:
                return _approval(row), True
            row = await conn.fetchrow(
                "SELECT * FROM session_approvals WHERE tenant_id = $1 AND request_id = $2",
                new.tenant_id,
                new.request_id,
            )
        assert row is not None
        return _approval(row), False

    async def approval_by_request(self, tenant_id: str, request_id: str) -> Approval | None:
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM session_approvals WHERE tenant_id = $1 AND request_id = $2",
                tenant_id,
                request_id,
            )
        return None if row is None else _approval(row)

    async def approval(self, tenant_id: str, approval_id: str) -> Approval | None:
        key = _uuid(approval_id)
        if key is None:
            return None
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM session_approvals WHERE tenant_id = $1 AND id = $2", tenant_id, key
            )
        return None if row is None else _approval(row)

    async def list_approvals(
        self,
        tenant_id: str,
        where: ApprovalFilter,
        now: float,
        after: tuple[float, str] | None,
        limit: int,
    ) -> list[Approval]:
        awaiting = where.approver_roles is not None
        async with self._acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM session_approvals WHERE tenant_id = $1 "
                "AND ($2::text IS NULL OR state = $2) "
                "AND ($3::uuid IS NULL OR session_id = $3) "
                "AND (NOT $4 OR (state = 'PENDING' AND expires_at > $5 "
                "AND approver_roles && $6::text[] AND NOT requester_chain && $7::text[])) "
                "AND ($8::timestamptz IS NULL OR (created_at, id) < ($8, $9::uuid)) "
                "ORDER BY created_at DESC, id DESC LIMIT $10",
                tenant_id,
                None if where.state is None else where.state.value,
                _uuid(where.session_id) if where.session_id else None,
                awaiting,
                _ts(now),
                list(where.approver_roles or ()),
                list(where.not_requested_by),
                None if after is None else _ts(after[0]),
                None if after is None else _uuid(after[1]),
                limit,
            )
        return [_approval(r) for r in rows]

    async def decide(
        self,
        tenant_id: str,
        approval_id: str,
        state: ApprovalState,
        decided_by: str,
        note: str,
        token_hash: bytes | None,
        now: float,
    ) -> Approval | None:
        """Decide a PENDING, unexpired approval; None if it is not (any more)."""
        key = _uuid(approval_id)
        if key is None:
            return None
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                "UPDATE session_approvals SET state = $3, decided_by = $4, decision_note = $5, "
                "token_hash = $6, decided_at = $7, revision = revision + 1 "
                "WHERE tenant_id = $1 AND id = $2 AND state = 'PENDING' AND expires_at > $7 "
                "RETURNING *",
                tenant_id,
                key,
                state.value,
                decided_by,
                note,
                token_hash,
                _ts(now),
            )
        return None if row is None else _approval(row)

    async def expire_approval(self, tenant_id: str, approval_id: str, now: float) -> None:
        async with self._acquire() as conn:
            await conn.execute(
                "UPDATE session_approvals SET state = 'EXPIRED', revision = revision + 1 "
                "WHERE tenant_id = $1 AND id = $2 AND state = 'PENDING' AND expires_at <= $3",
                tenant_id,
                uuid.UUID(approval_id),
                _ts(now),
            )

    async def expire_due_approvals(self, now: float, limit: int) -> list[Approval]:
        async with self._acquire() as conn:
            rows = await conn.fetch(
                "UPDATE session_approvals SET state = 'EXPIRED', revision = revision + 1 "
                "WHERE id IN (SELECT id FROM session_approvals WHERE state = 'PENDING' "
                "AND expires_at <= $1 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED) "
                "AND state = 'PENDING' RETURNING *",
                _ts(now),
                limit,
            )
        return [_approval(r) for r in rows]

    async def redeem(
        self,
        tenant_id: str,
        token_hash: bytes,
        digest: bytes,
        principal_id: str,
        session_id: str | None,
        now: float,
    ) -> tuple[Approval | None, Approval | None]:
        """(redeemed, None) when every binding matches, the token was unspent and its session
        (if any) is live: atomically marked spent. Otherwise (None, the approval the token
        belongs to, if any)."""
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                "UPDATE session_approvals SET redeemed_at = $6, revision = revision + 1 "
                "WHERE tenant_id = $1 AND token_hash = $2 AND state = 'APPROVED' "
                "AND redeemed_at IS NULL AND expires_at > $6 AND action_digest = $3 "
                "AND requester_id = $4 AND session_id IS NOT DISTINCT FROM $5 "
                "AND ($5::uuid IS NULL OR EXISTS (SELECT 1 FROM agent_sessions s "
                "WHERE s.id = $5 AND s.tenant_id = $1 AND s.state = ANY($7::text[]) "
                "AND s.expires_at > $6)) RETURNING *",
                tenant_id,
                token_hash,
                digest,
                principal_id,
                _uuid(session_id) if session_id else None,
                _ts(now),
                list(LIVE_SESSION_STATES),
            )
            if row is not None:
                return _approval(row), None
            found = await conn.fetchrow(
                "SELECT * FROM session_approvals WHERE tenant_id = $1 AND token_hash = $2",
                tenant_id,
                token_hash,
            )
        return None, None if found is None else _approval(found)
