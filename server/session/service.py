"""SessionManager: agent sessions with a strict lifecycle, task hand-offs, approval gates.

Lifecycle (docs/session.md): PENDING → ACTIVE → COMPLETED | FAILED | EXPIRED, PENDING →
EXPIRED, PENDING | ACTIVE → CANCELLED. Every transition is one conditional UPDATE in
PostgreSQL, so of racing transitions exactly one wins; the losers are told the state they
found. Expiry happens lazily on read and in `sweep` (any process). Ending a session puts its
id on the revocation deny-list, so delegated tokens bound to it (`asid`) stop authenticating;
`tokens_revoked_at` records that, and the sweeper retries any that did not get there. Expiry
and each revocation are security-class audit entries the manager records itself
(`SecurityEvents`): durable from the sweeper and from transition calls, queued on a read.

Watchers: every session revision is stored (agent_session_events) in the statement that makes
the change, and a message on the cache's pub/sub channel only says "look again". A watcher
therefore re-reads PostgreSQL after each message, after reconnecting and at least every
`watch_poll` seconds, so a lost message delays a change but never loses it.

Approvals: PENDING → APPROVED | DENIED | EXPIRED. Approving returns a single-use token bound to
(digest, requester, session), shown once and stored as SHA-256; `redeem_approval` spends it
in one conditional UPDATE.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from trustplane.common.v1 import error_reason_pb2 as reasons

from server.actor import ActorContext, PrincipalType
from server.audit.model import EVENT, SECURITY, Record
from server.cache import Cache, CacheUnavailable
from server.config import SessionConfig
from server.errors import (
    AlreadyExists,
    EtagMismatch,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from server.page_token import PageTokens, page_size
from server.revocation import raise_if_cancelled
from server.session.model import (
    SESSION_TRANSITIONS,
    TASK_TRANSITIONS,
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
from server.session.store import PgSessionStore

_log = logging.getLogger("trustplane.session")

_TOKEN_PREFIX = "tpap_"  # noqa: S105 - a prefix, not a secret
_LABEL = re.compile(r"^[a-z0-9][a-z0-9_.:-]{0,63}$")
_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")
_MAX_LABELS = 64
_MAX_METADATA = 16 * 1024
_MAX_PAYLOAD = 64 * 1024
_MAX_TEXT = 1024
_SWEEP_BATCH = 500
_READS_KEPT = 10_000
CHANGED = "sessions:changed"
"""The cache channel on which every session change is announced (payload: the session id), so
every process drops its shared read of it (GetSession, policy decisions)."""
T = TypeVar("T")


# --- errors -----------------------------------------------------------------------------


class SessionNotFound(NotFound):
    default_message = "session not found"


class TaskNotFound(NotFound):
    default_message = "task not found"


class ApprovalNotFound(NotFound):
    default_message = "approval not found"


class InvalidTransition(FailedPrecondition):
    reason = reasons.ERROR_REASON_SESSION_INVALID_TRANSITION


class SessionTerminal(FailedPrecondition):
    reason = reasons.ERROR_REASON_SESSION_TERMINAL


class TaskInvalidTransition(FailedPrecondition):
    reason = reasons.ERROR_REASON_TASK_INVALID_TRANSITION


class ApprovalNotPending(FailedPrecondition):
    reason = reasons.ERROR_REASON_APPROVAL_NOT_PENDING


class SelfDecision(PermissionDenied):
    reason = reasons.ERROR_REASON_APPROVAL_SELF_DECISION
    default_message = "an approval cannot be decided by its requester or anyone in its chain"


class ApproverRoleMissing(PermissionDenied):
    reason = reasons.ERROR_REASON_APPROVER_ROLE_MISSING
    default_message = "the caller holds none of the approval's approver roles"


class ApprovalTokenInvalid(InvalidArgument):
    reason = reasons.ERROR_REASON_APPROVAL_TOKEN_INVALID
    default_message = "approval token is invalid"


class ApprovalTokenRedeemed(FailedPrecondition):
    reason = reasons.ERROR_REASON_APPROVAL_TOKEN_REDEEMED
    default_message = "approval token was already redeemed"


class ApprovalDigestMismatch(PermissionDenied):
    reason = reasons.ERROR_REASON_APPROVAL_DIGEST_MISMATCH
    default_message = "approval token was issued for another action"


class ApprovalBindingMismatch(PermissionDenied):
    reason = reasons.ERROR_REASON_APPROVAL_BINDING_MISMATCH
    default_message = "approval token is bound to another principal or session"


class ApprovalExpired(FailedPrecondition):
    reason = reasons.ERROR_REASON_APPROVAL_EXPIRED
    default_message = "approval has expired"


class AgentSessionInvalid(InvalidArgument):
    reason = reasons.ERROR_REASON_AGENT_SESSION_INVALID
    default_message = "agent_session_id: no live session of this agent in the tenant"

    def __init__(self) -> None:
        super().__init__(
            field_violations=[
                FieldViolation("agent_session_id", "no live session of this agent in the tenant")
            ]
        )


def invalid_transition(current: str, target: str, allowed: Sequence[str]) -> InvalidTransition:
    return InvalidTransition(
        f"cannot move a {current} session to {target}",
        metadata={"state": current, "target": target, "allowed_from": ",".join(allowed)},
    )


# --- what the manager needs from other features -------------------------------------------


class AgentRecord(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def type(self) -> PrincipalType: ...
    @property
    def owner_id(self) -> str | None: ...
    @property
    def disabled(self) -> bool: ...


class AgentDirectory(Protocol):
    """Looks agents up (the Auth store)."""

    async def principal(self, tenant_id: str, principal_id: str) -> AgentRecord | None: ...


class AgentSessionRevoker(Protocol):
    """The deny-list (RevocationList)."""

    async def revoke_agent_session(self, tenant_id: str, session_id: str) -> None: ...


class SecurityEvents(Protocol):
    """Where what happens to a session outside any RPC is recorded: expiry and the revocation
    of its delegated tokens (AuditLog). `offer` queues without waiting (False: the queue is
    full), `put` waits for room, `commit` returns once the entries are durable."""

    def offer(self, record: Record) -> bool: ...
    async def put(self, record: Record) -> None: ...
    async def commit(self, records: Sequence[Record]) -> list[int]: ...


def _is_admin(actor: ActorContext) -> bool:
    return bool({"admin", "owner"} & actor.roles)


def _is_person(actor: ActorContext) -> bool:
    """A user calling with its own credential (no agent acting for it)."""
    return actor.subject_type is PrincipalType.USER and not actor.act


def _uuid_or_none(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _channel(kind: str, resource_id: str) -> str:
    return f"{kind}:{resource_id}"


class SessionManager:
    """See the module docstring."""

    def __init__(
        self,
        store: PgSessionStore,
        agents: AgentDirectory,
        revocations: AgentSessionRevoker,
        cache: Cache,
        config: SessionConfig,
        page_tokens: PageTokens,
        *,
        audit: SecurityEvents | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._agents = agents
        self._revocations = revocations
        self._audit = audit
        self._cache = cache
        self._config = config
        self._page_tokens = page_tokens
        self._clock = clock
        self._closing = asyncio.Event()
        # session id -> (monotonic expiry, session): shared reads, dropped on every change.
        self._reads: OrderedDict[str, tuple[float, AgentSession]] = OrderedDict()
        # (tenant, session id) -> the read of it in flight, shared by the callers that miss
        # together; a change to the session unregisters it, so its result is neither kept nor
        # handed to callers that arrive after the change.
        self._read_flights: dict[tuple[str, str], asyncio.Task[AgentSession | None]] = {}
        # session id -> (session, GetSession's encoded answer for it): see `answer_for`.
        self._answers: dict[str, tuple[AgentSession, Any]] = {}

    def close(self) -> None:
        """Shutting down: open watch streams end cleanly now instead of holding the server's
        grace period (clients resume elsewhere with `after_revision`)."""
        self._closing.set()

    # --- sessions: create and read ----------------------------------------------------------

    async def create_session(
        self,
        actor: ActorContext,
        *,
        agent_id: str,
        role: str,
        parent_session_id: str,
        task: str,
        metadata: dict[str, Any],
        labels: Sequence[str],
        ttl: float | None,
        request_id: str,
    ) -> AgentSession:
        _check_text(role=(role, 128), task=(task, _MAX_TEXT))
        _check_json("metadata", metadata, _MAX_METADATA)
        ttl = self._ttl(ttl, self._config.default_ttl, self._config.max_ttl)
        wanted = _labels(labels, "labels")
        try:
            agent, user = await self._agent_and_user(actor, agent_id)
            parent = await self._parent(actor, parent_session_id)
        except (NotFound, FailedPrecondition, PermissionDenied):
            # A retry of a create that committed may find its parent ended or its agent
            # disabled since: it still gets the session it created.
            earlier = await self._store.session_by_request(actor.tenant_id, request_id)
            if earlier is None or earlier.created_by != actor.actor_id:
                raise
            return earlier
        now = self._clock()
        new = NewSession(
            tenant_id=actor.tenant_id,
            agent_id=agent,
            user_id=user,
            role=role,
            parent_session_id=parent,
            task=task,
            metadata=metadata,
            labels=wanted,
            created_by=actor.actor_id,
            created_at=now,
            expires_at=now + ttl,
            request_id=request_id,
        )
        session, created = await self._store.create_session(new)
        if not created and session.created_by != actor.actor_id:
            raise AlreadyExists("request_id was already used by another caller")
        return session  # nobody can be watching yet: no notification

    async def _agent_and_user(self, actor: ActorContext, agent_id: str) -> tuple[str, str | None]:
        """The caller itself when it is an agent (own credential, or the current actor of a
        delegated token); otherwise `agent_id`, which the caller must own (admins: any)."""
        user = actor.subject if actor.subject_type is PrincipalType.USER else None
        acting = actor.act[0] if actor.act else None
        if acting is not None and acting.subject_type is PrincipalType.AGENT:
            return self._same_agent(acting.subject, agent_id), user
        if acting is None and actor.subject_type is PrincipalType.AGENT:
            return self._same_agent(actor.subject, agent_id), None
        if not agent_id:
            raise InvalidArgument.fields(
                FieldViolation("agent_id", "required unless the caller is an agent")
            )
        found = await self._agents.principal(actor.tenant_id, agent_id)
        if found is None or found.type is not PrincipalType.AGENT:
            raise NotFound("agent not found")
        if found.owner_id != actor.subject and not _is_admin(actor):
            raise PermissionDenied("the agent is not the caller's")
        if found.disabled:
            raise FailedPrecondition("the agent is disabled", metadata={"agent": "disabled"})
        return found.id, user

    @staticmethod
    def _same_agent(caller: str, agent_id: str) -> str:
        if agent_id and agent_id != caller:
            raise InvalidArgument.fields(
                FieldViolation("agent_id", "an agent can only create its own sessions")
            )
        return caller

    async def _parent(self, actor: ActorContext, parent_session_id: str) -> str | None:
        if not parent_session_id:
            return None
        parent = await self.get_session(actor, parent_session_id)
        if parent.state.terminal:
            raise SessionTerminal(
                f"the parent session is {parent.state.value}",
                metadata={"state": parent.state.value},
            )
        return parent.id

    async def get_session(self, actor: ActorContext, session_id: str) -> AgentSession:
        """The agent's status check: the shared read (see `_shared_read`), except that a
        session found past its expiry is expired for real first (lazy expiry, recorded)."""
        session = await self._shared_read(actor.tenant_id, session_id)
        if session is None:
            raise SessionNotFound()
        if session.state.terminal or session.expires_at > self._clock():
            return session
        return await self._live_view(actor.tenant_id, session_id)

    async def session_for_policy(self, tenant_id: str, session_id: str) -> AgentSession | None:
        """The session a policy decision runs in, as of now (past its expiry it reads as
        EXPIRED; the expiry itself is recorded by the sweeper or the next read, not here), or
        None."""
        session = await self._shared_read(tenant_id, session_id)
        return None if session is None else _as_seen(session, self._clock())

    async def _shared_read(self, tenant_id: str, session_id: str) -> AgentSession | None:
        """The stored session as GetSession and policy decisions see it, or None. Reused
        in-process for at most `read_ttl` seconds; every change to the session drops the copy
        at once in the changing process and, through `CHANGED`, in every other one, so the TTL
        bounds staleness only when that message is lost."""
        now = time.monotonic()
        cached = self._reads.get(session_id)
        if cached is not None and cached[0] > now and cached[1].tenant_id == tenant_id:
            self._reads.move_to_end(session_id)
            return cached[1]
        # One read per session at a time: the callers that miss together share it (a read
        # begun before a change is not shared with callers arriving after it).
        key = (tenant_id, session_id)
        flight = self._read_flights.get(key)
        if flight is None:
            flight = asyncio.create_task(self._read_shared(tenant_id, session_id))
            self._read_flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        return await asyncio.shield(flight)

    async def _read_shared(self, tenant_id: str, session_id: str) -> AgentSession | None:
        started = time.monotonic()
        session = await self._store.session(tenant_id, session_id)
        if session is None:
            return None  # absence is not cached: a session created elsewhere is seen at once
        current = self._read_flights.get((tenant_id, session_id)) is asyncio.current_task()
        if self._config.read_ttl > 0 and current:  # not if the session changed meanwhile
            self._reads[session.id] = (started + self._config.read_ttl, session)
            self._answers.pop(session.id, None)  # an answer for the read this one replaces
            self._reads.move_to_end(session.id)
            while len(self._reads) > _READS_KEPT:
                evicted, _ = self._reads.popitem(last=False)
                self._answers.pop(evicted, None)
        return session

    def _landed(self, key: tuple[str, str], task: asyncio.Task[AgentSession | None]) -> None:
        if self._read_flights.get(key) is task:
            del self._read_flights[key]
        if not task.cancelled():
            task.exception()  # retrieved: the waiters re-raise it

    def answer_for(self, session: AgentSession, encode: Callable[[AgentSession], T]) -> T:
        """GetSession's answer for `session` (what `encode` makes of it), kept beside the shared
        read while that read holds this very object and dropped with it — on a change, a
        purge, `forget` or eviction — so it is never older than the read and never outlives it.
        A session that is not the shared read (a lazy expiry's live view) is encoded each time.
        The kept answer is never modified; gRPC only serialises it."""
        kept = self._answers.get(session.id)
        if kept is not None and kept[0] is session:
            answer: T = kept[1]
            return answer
        answer = encode(session)
        read = self._reads.get(session.id)
        if read is not None and read[1] is session:
            self._answers[session.id] = (session, answer)
        return answer

    def forget(self, session_id: str | None = None) -> None:
        """Drop the shared read of one session (None: of all), and the answer kept beside it."""
        if session_id is None:
            self._reads.clear()
            self._read_flights.clear()
            self._answers.clear()
            return
        self._reads.pop(session_id, None)
        self._answers.pop(session_id, None)
        for key in [key for key in self._read_flights if key[1] == session_id]:
            del self._read_flights[key]  # few: only the reads in flight

    async def follow(self) -> None:
        """Drop shared reads of sessions other processes change; runs until cancelled. A
        broken subscription drops everything (messages may have been missed)."""
        while True:
            try:
                async with self._cache.subscribe(CHANGED) as subscription:
                    self.forget()
                    async for _channel, message in subscription:
                        self.forget(message.decode())
            except CacheUnavailable:
                raise_if_cancelled()
                _log.warning("session change channel unavailable; retrying")
            self.forget()
            await asyncio.sleep(1.0)

    async def _live_view(self, tenant_id: str, session_id: str) -> AgentSession:
        """The session, expired first if its time has passed (lazy expiry)."""
        session = await self._store.session(tenant_id, session_id)
        if session is None:
            raise SessionNotFound()
        if session.state.terminal or session.expires_at > self._clock():
            return session
        expired = await self._store.transition(
            tenant_id,
            session.id,
            SessionState.EXPIRED,
            SESSION_TRANSITIONS[SessionState.EXPIRED],
            self._clock(),
            "",
            None,
        )
        if expired is None:  # someone else changed it first: read what won
            return await self._live_view(tenant_id, session_id)
        revoked = await self._ended(expired)
        # A read must stay fast: its audit entries are queued, not waited for.
        await self._queue(_expired_event(expired, "read"))
        if revoked is not None:
            await self._queue(revoked)
        return expired

    async def list_sessions(
        self, actor: ActorContext, where: SessionFilter, size: int, token: str
    ) -> tuple[list[AgentSession], str]:
        limit = page_size(size)
        _check_times(created_after=where.created_after, created_before=where.created_before)
        query = _query("ListSessions", actor.tenant_id, where)
        after = self._position(query, token)
        now = self._clock()
        found = await self._store.list_sessions(actor.tenant_id, where, now, after, limit + 1)
        page = [_as_seen(s, now) for s in found[:limit]]
        if len(found) <= limit:
            return page, ""
        last = found[limit - 1]
        return page, self._page_tokens.encode(query, {"t": last.created_at, "id": last.id})

    def _position(self, query: str, token: str) -> tuple[float, str] | None:
        if not token:
            return None
        position = self._page_tokens.decode(query, token)
        return float(position["t"]), str(position["id"])

    # --- sessions: change -------------------------------------------------------------------

    async def update_session(
        self,
        actor: ActorContext,
        session_id: str,
        *,
        metadata: dict[str, Any] | None,
        labels: Sequence[str] | None,
        etag: str,
    ) -> AgentSession:
        if metadata is not None:
            _check_json("session.metadata", metadata, _MAX_METADATA)
        wanted = None if labels is None else _labels(labels, "session.labels")
        current = await self._changeable(actor, session_id)
        if wanted is not None and not set(current.labels) <= set(wanted):
            raise InvalidArgument.fields(
                FieldViolation("session.labels", "labels can only be added, never removed")
            )
        return await self._change(current, etag, metadata=metadata, labels=wanted)

    async def add_labels(
        self, actor: ActorContext, session_id: str, labels: Sequence[str]
    ) -> AgentSession:
        wanted = _labels(labels, "labels")
        if not wanted:
            raise InvalidArgument.fields(FieldViolation("labels", "name at least one label"))
        current = await self._changeable(actor, session_id)
        return await self._change(current, "", metadata=None, labels=wanted)

    async def _change(
        self,
        current: AgentSession,
        etag: str,
        *,
        metadata: dict[str, Any] | None,
        labels: Sequence[str] | None,
    ) -> AgentSession:
        revision = _revision(etag)
        if revision is not None and revision != current.revision:
            raise EtagMismatch()
        changed = await self._store.update_session(
            current.tenant_id,
            current.id,
            self._clock(),
            metadata=metadata,
            labels=labels,
            revision=revision,
        )
        if changed is not None:
            await self._announce("sessions", changed.id, changed.revision)
            return changed
        latest = await self._live_view(current.tenant_id, current.id)
        if latest.state.terminal:
            raise _terminal(latest)
        if revision is not None and latest.revision != revision:
            raise EtagMismatch()
        return latest  # nothing to change: the session already holds these values

    async def _open_session(self, actor: ActorContext, session_id: str) -> AgentSession:
        """A live session of the caller's tenant (tasks and approvals are made only in one)."""
        session = await self._live_view(actor.tenant_id, session_id)
        if session.state.terminal:
            raise _terminal(session)
        return session

    async def _open_session_of(self, tenant_id: str, session_id: str | None) -> None:
        if session_id is not None:
            session = await self._live_view(tenant_id, session_id)
            if session.state.terminal:
                raise _terminal(session)

    async def _changeable(self, actor: ActorContext, session_id: str) -> AgentSession:
        session = await self._live_view(actor.tenant_id, session_id)
        _check_may_change(actor, session)
        if session.state.terminal:
            raise _terminal(session)
        return session

    async def transition(
        self,
        actor: ActorContext,
        session_id: str,
        target: SessionState,
        *,
        etag: str = "",
        reason: str = "",
    ) -> AgentSession:
        """Move the session to `target` if its state allows; exactly one of racing callers
        wins, the others get FAILED_PRECONDITION (or ABORTED for a stale etag)."""
        _check_text(reason=(reason, _MAX_TEXT))
        revision = _revision(etag)
        allowed = SESSION_TRANSITIONS[target]
        current = await self._live_view(actor.tenant_id, session_id)
        _check_may_change(actor, current)
        if current.state in allowed:
            changed = await self._store.transition(
                actor.tenant_id, current.id, target, allowed, self._clock(), reason, revision
            )
            if changed is not None:
                if target.terminal:
                    revoked = await self._ended(changed)
                    if revoked is not None:  # a security call: durable before the answer
                        await self._commit([revoked])
                else:
                    await self._announce("sessions", changed.id, changed.revision)
                return changed
            current = await self._live_view(actor.tenant_id, session_id)
        names = [s.value for s in allowed]
        if current.state not in allowed:
            raise invalid_transition(current.state.value, target.value, names)
        raise EtagMismatch()

    async def _ended(self, session: AgentSession) -> Record | None:
        """A session reached a terminal state: tell watchers, revoke its delegated tokens.
        Returns the revocation's audit entry for the caller to record (None: deferred)."""
        await self._announce("sessions", session.id, session.revision)
        try:
            await self._revocations.revoke_agent_session(session.tenant_id, session.id)
        except CacheUnavailable:
            # The deny-list is unreachable, and so every token check fails closed meanwhile;
            # the sweeper writes the entry once the cache is back (and records it then).
            _log.warning("agent session revocation deferred", extra={"session": session.id})
            return None
        await self._store.mark_revoked([session.id], self._clock())
        return _revoked_event(session, self._clock())

    async def _queue(self, record: Record) -> None:
        """An audit entry through the bounded queue: no wait unless it is full."""
        if self._audit is not None and not self._audit.offer(record):
            await self._audit.put(record)

    async def _commit(self, records: Sequence[Record]) -> None:
        """Audit entries, durably, one commit per tenant (they are group-committed)."""
        if self._audit is None or not records:
            return
        tenants: dict[str, list[Record]] = {}
        for record in records:
            tenants.setdefault(record.tenant_id, []).append(record)
        audit = self._audit
        await asyncio.gather(*(audit.commit(group) for group in tenants.values()))

    async def _announce(self, kind: str, resource_id: str, revision: int) -> None:
        """Tell watchers in every process to look again, and (sessions) every process to drop
        its policy read; best effort (watchers also poll, policy reads also expire)."""
        if kind == "sessions":
            self.forget(resource_id)
        try:
            await self._cache.publish(_channel(kind, resource_id), str(revision).encode())
            if kind == "sessions":
                await self._cache.publish(CHANGED, resource_id.encode())
        except CacheUnavailable:
            _log.warning("watch notification lost", extra={"kind": kind})

    # --- watch ------------------------------------------------------------------------------

    async def watch_session(
        self, actor: ActorContext, session_id: str, after_revision: int
    ) -> AsyncIterator[AgentSession]:
        """The current state (or every revision after `after_revision`), then every change in
        revision order; ends after a terminal state."""
        if after_revision < 0:
            raise InvalidArgument.fields(FieldViolation("after_revision", "must not be negative"))
        first = await self._live_view(actor.tenant_id, session_id)
        last = after_revision
        if after_revision == 0:
            yield first
            last = first.revision
        done = first.state.terminal and first.revision <= last

        async def changes() -> list[AgentSession]:
            await self._live_view(actor.tenant_id, first.id)  # expiry is a change too
            return await self._store.revisions(actor.tenant_id, first.id, last)

        while not done:
            batch = await self._wait(_channel("sessions", first.id), changes)
            for session in batch:
                yield session
                last = session.revision
                done = session.state.terminal
            done = done or not batch  # an empty batch: the server is closing

    async def _wait(self, channel: str, read: Callable[[], Awaitable[list[T]]]) -> list[T]:
        """The next non-empty batch of changes: read, and if nothing is new wait for a
        notification (or the poll interval) and read again. Empty once the server closes."""
        while not self._closing.is_set():
            try:
                async with self._cache.subscribe(channel) as subscription:
                    while not self._closing.is_set():
                        found = await read()  # after subscribing: nothing slips between
                        if found:
                            return found
                        await self._pause(anext(subscription))
            except CacheUnavailable:
                found = await read()
                if found:
                    return found
                await self._pause(None)
        return []

    async def _pause(self, notified: Awaitable[Any] | None) -> None:
        """Until a notification arrives, the poll interval passes or the server closes. A
        subscription that ended (the cache is closing) counts as unavailable, so the caller
        falls back to polling instead of spinning."""
        waiters = {asyncio.ensure_future(self._closing.wait())}
        if notified is not None:
            waiters.add(asyncio.ensure_future(notified))
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=self._config.watch_poll, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        for finished in done:
            error = finished.exception()
            if isinstance(error, StopAsyncIteration):
                raise CacheUnavailable()
            if error is not None:
                raise error

    # --- sweeper ----------------------------------------------------------------------------

    async def sweep(self) -> None:
        """Expire sessions and approvals past their time, retry deferred revocations, and
        purge what ended more than the retention period ago. Safe in every process at once."""
        now = self._clock()
        expired = await self._store.expire_due(now, _SWEEP_BATCH)
        revoked = [await self._ended(session) for session in expired]  # tokens die first
        events = [_expired_event(s, "sweep") for s in expired]
        await self._commit([*events, *(r for r in revoked if r is not None)])
        for approval in await self._store.expire_due_approvals(now, _SWEEP_BATCH):
            await self._announce("approvals", approval.id, approval.revision)
        await self._revoke_deferred()
        cutoff = now - self._config.retention_days * 86_400.0
        purged = await self._store.purge(cutoff, _SWEEP_BATCH)
        if purged:
            # Gone for good: no shared read of them here may outlive the purge (other
            # processes keep theirs, long-ended and unchangeable, for at most `read_ttl`).
            self.forget()
            _log.info("purged ended sessions", extra={"count": purged})

    async def _revoke_deferred(self) -> None:
        """Write the deny-list entries an ending could not (the cache was unreachable); while
        it still is, they stay pending for the next sweep and the rest of the sweep goes on."""
        pending = await self._store.unrevoked(_SWEEP_BATCH)
        written: list[tuple[str, str]] = []
        try:
            for tenant_id, session_id in pending:
                await self._revocations.revoke_agent_session(tenant_id, session_id)
                written.append((tenant_id, session_id))
        except CacheUnavailable:
            _log.warning(
                "agent session revocations still deferred",
                extra={"pending": len(pending) - len(written)},
            )
        if written:
            await self._store.mark_revoked([s for _, s in written], self._clock())
            at = self._clock()
            await self._commit([_deferred_revocation(t, s, at) for t, s in written])

    # --- delegation hook (Auth) -------------------------------------------------------------

    async def check_delegable(self, tenant_id: str, session_id: str, agent_id: str) -> None:
        """For token exchange: the session exists in the tenant, runs `agent_id`, and is live.
        Any failure is the same AGENT_SESSION_INVALID (nothing about other tenants leaks)."""
        try:
            session = await self._live_view(tenant_id, session_id)
        except SessionNotFound:
            raise AgentSessionInvalid() from None
        if session.agent_id != agent_id or session.state.terminal:
            raise AgentSessionInvalid()

    # --- tasks ------------------------------------------------------------------------------

    async def create_task(
        self,
        actor: ActorContext,
        *,
        session_id: str,
        type: str,
        from_role: str,
        to_role: str,
        payload: dict[str, Any],
        trace_id: str,
        request_id: str,
    ) -> Task:
        problems = []
        if not _TYPE.match(type):
            problems.append(FieldViolation("type", "1-128 of [A-Za-z0-9_.:/-]"))
        for name, value in (("from_role", from_role), ("to_role", to_role)):
            if not 1 <= len(value) <= 128:
                problems.append(FieldViolation(name, "1-128 characters"))
        if len(trace_id) > 128:
            problems.append(FieldViolation("trace_id", "at most 128 characters"))
        if problems:
            raise InvalidArgument.fields(*problems)
        _check_json("payload", payload, _MAX_PAYLOAD)
        try:
            session = await self._open_session(actor, _required(session_id, "session_id"))
        except (SessionNotFound, SessionTerminal):
            earlier = await self._store.task_by_request(actor.tenant_id, request_id)
            if earlier is None or earlier.created_by != actor.actor_id:
                raise
            return earlier  # a retry of a create that committed before the session ended
        new = NewTask(
            tenant_id=actor.tenant_id,
            session_id=session.id,
            type=type,
            from_role=from_role,
            to_role=to_role,
            payload=payload,
            trace_id=trace_id,
            created_by=actor.actor_id,
            created_at=self._clock(),
            request_id=request_id,
        )
        created, fresh = await self._store.create_task(new)
        if not fresh and created.created_by != actor.actor_id:
            raise AlreadyExists("request_id was already used by another caller")
        return created

    async def get_task(self, actor: ActorContext, task_id: str) -> Task:
        found = await self._store.task(actor.tenant_id, task_id)
        if found is None:
            raise TaskNotFound()
        return found

    async def list_tasks(
        self,
        actor: ActorContext,
        session_id: str,
        state: TaskState | None,
        to_role: str,
        size: int,
        token: str,
    ) -> tuple[list[Task], str]:
        limit = page_size(size)
        session = await self._live_view(actor.tenant_id, _required(session_id, "session_id"))
        query = "\0".join(
            ("ListTasks", actor.tenant_id, session.id, state.value if state else "", to_role)
        )
        after = self._position(query, token)
        found = await self._store.list_tasks(
            actor.tenant_id, session.id, state, to_role, after, limit + 1
        )
        if len(found) <= limit:
            return found, ""
        last = found[limit - 1]
        return found[:limit], self._page_tokens.encode(query, {"t": last.created_at, "id": last.id})

    async def update_task_state(
        self, actor: ActorContext, task_id: str, target: TaskState, message: str, etag: str
    ) -> Task:
        _check_text(status_message=(message, _MAX_TEXT))
        allowed = TASK_TRANSITIONS.get(target)
        if allowed is None:
            raise InvalidArgument.fields(
                FieldViolation("state", "IN_PROGRESS, COMPLETED, FAILED or CANCELLED")
            )
        revision = _revision(etag)
        current = await self.get_task(actor, task_id)
        changed = None
        if current.state in allowed:
            changed = await self._store.transition_task(
                actor.tenant_id, current.id, target, allowed, message, self._clock(), revision
            )
            if changed is not None:
                return changed
            current = await self.get_task(actor, task_id)
        if current.state not in allowed:
            raise TaskInvalidTransition(
                f"cannot move a {current.state.value} task to {target.value}",
                metadata={"state": current.state.value, "target": target.value},
            )
        raise EtagMismatch()

    # --- approvals --------------------------------------------------------------------------

    async def request_approval(
        self,
        actor: ActorContext,
        *,
        session_id: str,
        digest: bytes,
        action: str,
        reason: str,
        approver_roles: Sequence[str],
        ttl: float | None,
        request_id: str,
    ) -> Approval:
        problems = []
        if not 16 <= len(digest) <= 64:
            problems.append(FieldViolation("action_digest", "16-64 bytes (e.g. a SHA-256)"))
        roles = tuple(sorted(set(approver_roles)))
        if not 1 <= len(roles) <= 16 or not all(1 <= len(r) <= 64 for r in roles):
            problems.append(FieldViolation("approver_roles", "1-16 roles of 1-64 characters"))
        if problems:
            raise InvalidArgument.fields(*problems)
        _check_text(action=(action, _MAX_TEXT), reason=(reason, _MAX_TEXT))
        ttl = self._ttl(ttl, self._config.approval_default_ttl, self._config.approval_max_ttl)
        try:
            bound = (await self._open_session(actor, session_id)).id if session_id else None
        except (SessionNotFound, SessionTerminal):
            earlier = await self._store.approval_by_request(actor.tenant_id, request_id)
            if earlier is None or earlier.requester_id != actor.actor_id:
                raise
            return earlier  # a retry of a request that committed before the session ended
        now = self._clock()
        new = NewApproval(
            tenant_id=actor.tenant_id,
            session_id=bound,
            requester_id=actor.actor_id,
            requester_chain=actor.chain,
            action_digest=digest,
            action=action,
            reason=reason,
            approver_roles=roles,
            created_at=now,
            expires_at=now + ttl,
            request_id=request_id,
        )
        approval, created = await self._store.create_approval(new)
        if not created and approval.requester_id != actor.actor_id:
            raise AlreadyExists("request_id was already used by another caller")
        return approval

    async def get_approval(self, actor: ActorContext, approval_id: str) -> Approval:
        return await self._approval_view(actor.tenant_id, approval_id)

    async def _approval_view(self, tenant_id: str, approval_id: str) -> Approval:
        found = await self._store.approval(tenant_id, approval_id)
        if found is None:
            raise ApprovalNotFound()
        if found.state is ApprovalState.PENDING and found.expires_at <= self._clock():
            await self._store.expire_approval(tenant_id, found.id, self._clock())
            await self._announce("approvals", found.id, found.revision + 1)
            return await self._approval_view(tenant_id, approval_id)
        return found

    async def list_approvals(
        self,
        actor: ActorContext,
        state: ApprovalState | None,
        session_id: str,
        awaiting_me: bool,
        size: int,
        token: str,
    ) -> tuple[list[Approval], str]:
        limit = page_size(size)
        if session_id and _uuid_or_none(session_id) is None:
            return [], ""
        if awaiting_me and not _is_person(actor):
            return [], ""  # only people decide approvals
        where = ApprovalFilter(
            state=state,
            session_id=session_id,
            approver_roles=tuple(sorted(actor.roles)) if awaiting_me else None,
            not_requested_by=actor.chain if awaiting_me else (),
        )
        query = "\0".join(
            (
                "ListApprovals",
                actor.tenant_id,
                actor.actor_id,
                state.value if state else "",
                session_id,
                str(awaiting_me),
            )
        )
        after = self._position(query, token)
        found = await self._store.list_approvals(
            actor.tenant_id, where, self._clock(), after, limit + 1
        )
        now = self._clock()
        page = [_approval_as_seen(a, now) for a in found[:limit]]
        if len(found) <= limit:
            return page, ""
        last = found[limit - 1]
        return page, self._page_tokens.encode(query, {"t": last.created_at, "id": last.id})

    async def approve(
        self, actor: ActorContext, approval_id: str, note: str
    ) -> tuple[Approval, str]:
        """Approve; returns the approval and its single-use token (never stored in clear)."""
        token = _TOKEN_PREFIX + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
        approval = await self._decide(
            actor, approval_id, ApprovalState.APPROVED, note, _token_hash(token)
        )
        return approval, token

    async def deny(self, actor: ActorContext, approval_id: str, note: str) -> Approval:
        return await self._decide(actor, approval_id, ApprovalState.DENIED, note, None)

    async def _decide(
        self,
        actor: ActorContext,
        approval_id: str,
        state: ApprovalState,
        note: str,
        token_hash: bytes | None,
    ) -> Approval:
        _check_text(note=(note, _MAX_TEXT))
        current = await self._approval_view(actor.tenant_id, approval_id)
        if not _is_person(actor):
            raise PermissionDenied("approvals are decided by people with their own credentials")
        if set(actor.chain) & set(current.requester_chain):
            raise SelfDecision()
        if not set(actor.roles) & set(current.approver_roles):
            raise ApproverRoleMissing(metadata={"approver_roles": ",".join(current.approver_roles)})
        decided = await self._store.decide(
            actor.tenant_id, current.id, state, actor.actor_id, note, token_hash, self._clock()
        )
        if decided is None:
            latest = await self._approval_view(actor.tenant_id, current.id)
            raise ApprovalNotPending(
                f"the approval is {latest.state.value}", metadata={"state": latest.state.value}
            )
        await self._announce("approvals", decided.id, decided.revision)
        return decided

    async def redeem_approval(
        self,
        tenant_id: str,
        token: str,
        *,
        digest: bytes,
        principal_id: str,
        session_id: str | None,
    ) -> Approval:
        """Spend an approval token for the exact action it approved, atomically and once.

        The token must have been issued in `tenant_id` for `digest`, requested by
        `principal_id` within `session_id` (None: no session), be unexpired and unspent. For
        the Policy service's re-check and the RedeemApproval RPC."""
        if not token.startswith(_TOKEN_PREFIX) or len(token) > 128:
            raise ApprovalTokenInvalid()
        if session_id and _uuid_or_none(session_id) is None:
            raise ApprovalBindingMismatch()
        now = self._clock()
        redeemed, found = await self._store.redeem(
            tenant_id, _token_hash(token), digest, principal_id, session_id or None, now
        )
        if redeemed is not None:
            await self._announce("approvals", redeemed.id, redeemed.revision)
            return redeemed
        problem = _redeem_failure(found, digest, principal_id, session_id or None, now)
        if isinstance(problem, ApprovalTokenRedeemed) and found and found.redeemed_at is None:
            await self._open_session_of(tenant_id, found.session_id)  # ended since approved?
        raise problem

    async def watch_approval(
        self, actor: ActorContext, approval_id: str
    ) -> AsyncIterator[Approval]:
        """The current state, then each change until the approval leaves PENDING."""
        current = await self._approval_view(actor.tenant_id, approval_id)
        yield current
        seen = [current]

        async def changed() -> list[Approval]:
            latest = await self._approval_view(actor.tenant_id, approval_id)
            return [latest] if latest.revision > seen[-1].revision else []

        while seen[-1].state is ApprovalState.PENDING:
            batch = await self._wait(_channel("approvals", current.id), changed)
            if not batch:
                return  # the server is closing
            seen.append(batch[0])
            yield batch[0]

    # --- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _ttl(ttl: float | None, default: float, maximum: float) -> float:
        if ttl is None:
            return default
        if not 1.0 <= ttl <= maximum:
            raise InvalidArgument.fields(
                FieldViolation("ttl", f"between 1 second and {int(maximum)} seconds")
            )
        return ttl


def _system_event(
    tenant_id: str, session_id: str, event_type: str, now: float, attributes: dict[str, str]
) -> Record:
    """A security-class audit entry for something the server itself did to a session: no
    method, no subject (no caller acted); the session is its `session_id` and `resource`."""
    return Record(
        tenant_id=tenant_id,
        kind=EVENT,
        time_ms=int(now * 1000),
        method="",
        code="OK",
        session_id=session_id,
        resource=session_id,
        event_type=event_type,
        attributes=attributes,
        audit_class=SECURITY,
    )


def _expired_event(session: AgentSession, trigger: str) -> Record:
    """`session.expired`: found past its expiry on a read (`read`) or by the sweeper (`sweep`)."""
    facts = {"trigger": trigger, "agent_id": session.agent_id, "state": session.state.value}
    if session.user_id:
        facts["user_id"] = session.user_id
    ended = session.ended_at if session.ended_at is not None else session.updated_at
    record = _system_event(session.tenant_id, session.id, "session.expired", ended, facts)
    return replace(record, occurred_at_ms=int(session.expires_at * 1000))


def _revoked_event(session: AgentSession, now: float) -> Record:
    """`session.tokens_revoked`: the ended session's delegated tokens are on the deny-list."""
    facts = {"state": session.state.value, "deferred": "false"}
    return _system_event(session.tenant_id, session.id, "session.tokens_revoked", now, facts)


def _deferred_revocation(tenant_id: str, session_id: str, now: float) -> Record:
    """`session.tokens_revoked` by the sweeper, for a session that ended while the cache was
    unreachable."""
    facts = {"deferred": "true"}
    return _system_event(tenant_id, session_id, "session.tokens_revoked", now, facts)


def _redeem_failure(
    found: Approval | None, digest: bytes, principal: str, session: str | None, now: float
) -> Exception:
    if found is None or found.state is not ApprovalState.APPROVED:
        return ApprovalTokenInvalid()
    if found.redeemed_at is not None:
        return ApprovalTokenRedeemed()
    if found.action_digest != digest:
        return ApprovalDigestMismatch()
    if found.requester_id != principal or found.session_id != session:
        return ApprovalBindingMismatch()
    if found.expires_at <= now:
        return ApprovalExpired()
    return ApprovalTokenRedeemed()  # spent by a concurrent redemption between the two reads


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _check_may_change(actor: ActorContext, session: AgentSession) -> None:
    """Only the session's agent, its user, its creator or a tenant admin may change it."""
    involved = {session.agent_id, session.user_id, session.created_by}
    if not involved & set(actor.chain) and not _is_admin(actor):
        raise PermissionDenied("only the session's agent, user, creator or an admin may change it")


def _terminal(session: AgentSession) -> SessionTerminal:
    return SessionTerminal(
        f"the session is {session.state.value}", metadata={"state": session.state.value}
    )


def _as_seen(session: AgentSession, now: float) -> AgentSession:
    """How a listed session reads now: past its expiry it is EXPIRED (the sweeper will agree)."""
    if session.state.terminal or session.expires_at > now:
        return session
    return replace(session, state=SessionState.EXPIRED)


def _approval_as_seen(approval: Approval, now: float) -> Approval:
    if approval.state is not ApprovalState.PENDING or approval.expires_at > now:
        return approval
    return replace(approval, state=ApprovalState.EXPIRED)


def _labels(labels: Sequence[str], field: str) -> tuple[str, ...]:
    unique = sorted(set(labels))
    bad = [label for label in unique if not _LABEL.match(label)]
    if bad or len(unique) > _MAX_LABELS:
        raise InvalidArgument.fields(
            FieldViolation(field, f"at most {_MAX_LABELS} labels of 1-64 [a-z0-9_.:-]")
        )
    return tuple(unique)


def _check_text(**fields: tuple[str, int]) -> None:
    problems = [
        FieldViolation(name, f"at most {limit} characters, no NUL")
        for name, (value, limit) in fields.items()
        if len(value) > limit or "\x00" in value
    ]
    if problems:
        raise InvalidArgument.fields(*problems)


_LAST_SECOND = 253_402_300_799.0  # 9999-12-31T23:59:59Z, the end of google.protobuf.Timestamp


def _check_times(**fields: float | None) -> None:
    problems = [
        FieldViolation(name, "between 1970-01-01 and 9999-12-31")
        for name, value in fields.items()
        if value is not None and not 0.0 <= value <= _LAST_SECOND
    ]
    if problems:
        raise InvalidArgument.fields(*problems)


def _check_json(field: str, value: dict[str, Any], limit: int) -> None:
    try:
        encoded = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise InvalidArgument.fields(FieldViolation(field, "numbers must be finite")) from None
    if len(encoded) > limit or "\\u0000" in encoded:
        raise InvalidArgument.fields(
            FieldViolation(field, f"at most {limit} bytes serialized, no NUL characters")
        )


def _required(value: str, name: str) -> str:
    if not value:
        raise InvalidArgument.fields(FieldViolation(name, "required"))
    return value


def _revision(etag: str) -> int | None:
    if not etag:
        return None
    try:
        return int(etag.strip('"').rsplit("-", 1)[1])
    except (IndexError, ValueError):
        raise InvalidArgument.fields(FieldViolation("etag", "malformed etag")) from None


def _query(method: str, tenant_id: str, where: SessionFilter) -> str:
    """The page-token fingerprint of a listing: a token only continues the same query."""
    return "\0".join(
        (
            method,
            tenant_id,
            where.state.value if where.state else "",
            where.agent_id,
            where.user_id,
            repr(where.created_after),
            repr(where.created_before),
        )
    )
