"""SessionService through the real server: the lifecycle and its races, expiry and purge,
delegated tokens dying with their session, watchers, tasks, tenant isolation."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, struct_pb2, timestamp_pb2
from trustplane.audit.v1 import audit_pb2
from trustplane.auth.v1 import auth_pb2
from trustplane.session.v1 import session_pb2 as pb
from trustplane.session.v1 import session_pb2_grpc

from server.session.model import NewSession
from tests.support import services
from tests.support.process import app_process
from tests.support.status import expect_error
from tests.support.tokens import OTHER_TENANT, TENANT, bearer

AGENT = "agent-7"
S = pb.SessionState


def stub(running):
    return session_pb2_grpc.SessionServiceStub(running.channel)


def agent_token(idp, agent=AGENT, **claims):
    return bearer(idp.token(sub=agent, ptype="agent", **claims))


async def create(svc, credentials, **fields):
    request = pb.CreateSessionRequest(request_id=str(uuid.uuid4()), **fields)
    return (await svc.CreateSession(request, metadata=credentials)).session


async def get(svc, metadata, session_id):
    return (
        await svc.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=metadata)
    ).session


def seconds(value):
    return duration_pb2.Duration(seconds=value)


# The transition RPCs, by the state they lead to.
def transitions(svc):
    return {
        "start": lambda md, sid, **kw: svc.StartSession(
            pb.StartSessionRequest(session_id=sid, **kw), metadata=md
        ),
        "complete": lambda md, sid, **kw: svc.CompleteSession(
            pb.CompleteSessionRequest(session_id=sid, **kw), metadata=md
        ),
        "fail": lambda md, sid, **kw: svc.FailSession(
            pb.FailSessionRequest(session_id=sid, reason="tool crashed", **kw), metadata=md
        ),
        "cancel": lambda md, sid, **kw: svc.CancelSession(
            pb.CancelSessionRequest(session_id=sid, reason="user stopped it", **kw), metadata=md
        ),
    }


async def test_full_lifecycle(server, idp):
    svc, me = stub(server), agent_token(idp)
    metadata = struct_pb2.Struct()
    metadata.update({"model": "gpt", "budget": 3})
    created = await create(
        svc, me, role="planner", task="fix the bug", labels=["untrusted_input"], metadata=metadata
    )
    assert created.state == S.SESSION_STATE_PENDING and created.revision == 1
    assert created.agent_id == AGENT and created.user_id == "" and created.role == "planner"
    assert list(created.labels) == ["untrusted_input"] and created.metadata["model"] == "gpt"
    assert created.expire_time.seconds - created.create_time.seconds == 3600  # the default TTL
    ops = transitions(svc)
    started = (await ops["start"](me, created.session_id, etag=created.etag)).session
    assert started.state == S.SESSION_STATE_ACTIVE and started.start_time.seconds > 0
    assert started.revision == 2 and started.etag != created.etag
    done = (await ops["complete"](me, created.session_id)).session
    assert done.state == S.SESSION_STATE_COMPLETED and done.end_time.seconds > 0
    assert (await get(svc, me, created.session_id)) == done
    ended_parent = await expect_error(create(svc, me, parent_session_id=started.session_id))
    assert (ended_parent.code, ended_parent.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "SESSION_TERMINAL",
    )
    child = await create(svc, me, parent_session_id=(await create(svc, me)).session_id)
    assert child.parent_session_id and child.state == S.SESSION_STATE_PENDING


# From each reachable state, which transitions are allowed (the rest must be refused).
ALLOWED = {
    "PENDING": {"start", "cancel"},
    "ACTIVE": {"complete", "fail", "cancel"},
    "COMPLETED": set(),
    "FAILED": set(),
    "CANCELLED": set(),
    "EXPIRED": set(),
}
PATHS = {
    "PENDING": [],
    "ACTIVE": ["start"],
    "COMPLETED": ["start", "complete"],
    "FAILED": ["start", "fail"],
    "CANCELLED": ["cancel"],
}


async def session_events(server, idp, session_id):
    """The server's own audit entries (kind event) about one session, oldest first."""
    await server.app.audit.flush()
    listed = await server.audit.ListEntries(
        audit_pb2.ListEntriesRequest(kind=audit_pb2.ENTRY_KIND_EVENT, session_id=session_id),
        metadata=bearer(idp.token(roles=["viewer"])),
    )
    return list(listed.entries)


def count_reads(sessions, monkeypatch) -> list[str]:
    """The ids of the sessions the store reads from PostgreSQL from now on (the real reads,
    counted)."""
    reads: list[str] = []
    real = sessions._store.session

    async def counted(tenant_id, session_id):
        reads.append(session_id)
        return await real(tenant_id, session_id)

    monkeypatch.setattr(sessions._store, "session", counted)
    return reads


async def test_policy_reads_of_a_session_share_one_query_until_it_changes(
    start_server, idp, monkeypatch
):
    """What PolicyService reads of a session (SessionManager.session_for_policy): concurrent
    misses share one PostgreSQL read, the result is reused, and a change drops it at once."""
    async with start_server(TRUSTPLANE_SESSION_READ_TTL="60") as server:
        svc, me = stub(server), agent_token(idp)
        created = await create(svc, me, labels=["private_data"])
        sessions = server.app.sessions
        reads = count_reads(sessions, monkeypatch)
        found = await asyncio.gather(
            *(sessions.session_for_policy(TENANT, created.session_id) for _ in range(32))
        )
        assert {f.labels for f in found} == {("private_data",)} and len(reads) == 1
        assert (await sessions.session_for_policy(TENANT, created.session_id)) is not None
        assert len(reads) == 1  # reused
        assert await sessions.session_for_policy(OTHER_TENANT, created.session_id) is None
        await svc.AddSessionLabels(
            pb.AddSessionLabelsRequest(session_id=created.session_id, labels=["untrusted_input"]),
            metadata=me,
        )
        again = await sessions.session_for_policy(TENANT, created.session_id)
        assert again.labels == ("private_data", "untrusted_input")


async def test_get_session_is_one_shared_read_until_the_session_changes(
    start_server, idp, monkeypatch
):
    """GetSession (the agent's status check) is served from the shared read: repeated calls
    cost one PostgreSQL read, a change in this process is seen by the very next call, and a
    change to one session leaves the shared reads of the others in place."""
    async with start_server(TRUSTPLANE_SESSION_READ_TTL="60") as server:
        svc, me = stub(server), agent_token(idp)
        created, bystander = await create(svc, me), await create(svc, me)
        sessions = server.app.sessions
        reads = count_reads(sessions, monkeypatch)
        for _ in range(5):
            assert (await get(svc, me, created.session_id)).state == S.SESSION_STATE_PENDING
            assert (await get(svc, me, bystander.session_id)).state == S.SESSION_STATE_PENDING
        assert sorted(reads) == sorted([created.session_id, bystander.session_id])
        # The encoded answer is kept beside the shared read, and goes with it.
        assert set(sessions._answers) == {created.session_id, bystander.session_id}
        started = (await transitions(svc)["start"](me, created.session_id)).session
        assert created.session_id not in sessions._answers
        assert (await get(svc, me, created.session_id)) == started
        await get(svc, me, bystander.session_id)
        assert reads.count(bystander.session_id) == 1  # not dropped by the other's change
        other = await expect_error(get(svc, agent_token(idp, tid=OTHER_TENANT), created.session_id))
        assert (other.code, other.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
        sessions.forget()  # what a purge and a broken subscription do
        assert not sessions._answers


async def test_get_session_sees_a_change_made_in_another_process(start_server, make_config, idp):
    """The shared read is kept here for a minute, yet a transition made through a second
    server sharing PostgreSQL and Redis reaches GetSession on the first at once (pub/sub)."""
    config = make_config(TRUSTPLANE_SESSION_READ_TTL="60")
    me = agent_token(idp)
    async with start_server(config) as first, start_server(config) as second:
        created = await create(stub(first), me)
        assert (await get(stub(first), me, created.session_id)).state == S.SESSION_STATE_PENDING
        await transitions(stub(second))["start"](me, created.session_id)
        for _ in range(100):
            seen = await get(stub(first), me, created.session_id)
            if seen.state == S.SESSION_STATE_ACTIVE:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("GetSession kept a stale read of a session changed elsewhere")


async def test_expiry_and_revocation_are_security_audit_entries(start_server, idp):
    """Expiry is a transition no caller makes: the server records it, lazily on read (queued)
    and by the sweeper (committed before the sweep goes on), with the revocation of the
    session's delegated tokens it triggers."""
    now = [time.time()]
    async with start_server(clock=lambda: now[0]) as server:
        svc, me = stub(server), agent_token(idp)
        lazy = await create(svc, me, ttl=seconds(60))
        swept = await create(svc, me, ttl=seconds(60))
        await svc.StartSession(pb.StartSessionRequest(session_id=swept.session_id), metadata=me)
        cancelled = await create(svc, me)
        now[0] += 61
        assert (await get(svc, me, lazy.session_id)).state == S.SESSION_STATE_EXPIRED
        await server.app.sessions.sweep()
        await svc.CancelSession(
            pb.CancelSessionRequest(session_id=cancelled.session_id), metadata=me
        )
        for session, trigger in ((lazy, "read"), (swept, "sweep")):
            events = await session_events(server, idp, session.session_id)
            assert [e.event_type for e in events] == ["session.expired", "session.tokens_revoked"]
            expired, revoked = events
            assert (expired.audit_class, expired.code, expired.method) == ("security", "OK", "")
            assert (expired.subject, expired.resource) == ("", session.session_id)
            assert dict(expired.attributes) == {
                "trigger": trigger,
                "agent_id": AGENT,
                "state": "EXPIRED",
            }
            assert revoked.audit_class == "security"
            assert dict(revoked.attributes) == {"state": "EXPIRED", "deferred": "false"}
        # An explicit transition is its call's own entry; the revocation it causes is recorded.
        (revoked,) = await session_events(server, idp, cancelled.session_id)
        assert (revoked.event_type, revoked.attributes["state"]) == (
            "session.tokens_revoked",
            "CANCELLED",
        )


async def test_every_transition_from_every_state(start_server, idp):
    now = [time.time()]
    async with start_server(clock=lambda: now[0]) as server:
        svc, me = stub(server), agent_token(idp)
        ops = transitions(svc)
        for state, allowed in ALLOWED.items():
            for op in ops:
                session = await create(svc, me, ttl=seconds(60))
                if state == "EXPIRED":
                    now[0] += 61
                for step in PATHS.get(state, []):
                    await ops[step](me, session.session_id)
                before = await get(svc, me, session.session_id)
                assert S.Name(before.state) == f"SESSION_STATE_{state}"
                if op in allowed:
                    await ops[op](me, session.session_id)
                    continue
                status = await expect_error(ops[op](me, session.session_id))
                assert (status.code, status.reason) == (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "SESSION_INVALID_TRANSITION",
                ), (state, op)
                assert status.metadata["state"] == state, (state, op)
                assert await get(svc, me, session.session_id) == before  # nothing changed


async def test_twenty_racing_transitions_one_wins(server, idp):
    svc, me = stub(server), agent_token(idp)
    session = await create(svc, me)
    await svc.StartSession(pb.StartSessionRequest(session_id=session.session_id), metadata=me)
    ops = transitions(svc)
    names = ["complete", "fail", "cancel"]
    calls = [ops[names[i % 3]](me, session.session_id) for i in range(20)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 19
    assert {e.code() for e in losers} <= {
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
    }
    final = await get(svc, me, session.session_id)
    assert final.revision == 3 and final.state == winners[0].session.state


async def test_transitions_are_security_audit_entries_naming_the_session(server, idp):
    svc, me = stub(server), agent_token(idp)
    session = await create(svc, me)
    await svc.StartSession(pb.StartSessionRequest(session_id=session.session_id), metadata=me)
    refused = svc.CompleteSession(
        pb.CompleteSessionRequest(session_id=session.session_id, etag=session.etag), metadata=me
    )
    await expect_error(refused)
    owner = bearer(idp.token(roles=["owner"]))
    for _ in range(100):  # a refused call's status can reach us before its entry is committed
        await server.app.audit.flush()
        listed = await server.audit.ListEntries(
            audit_pb2.ListEntriesRequest(resource=session.session_id), metadata=owner
        )
        if len(listed.entries) >= 2:
            break
        await asyncio.sleep(0.02)
    entries = [(e.method.rsplit("/", 1)[1], e.code) for e in listed.entries]
    assert entries == [("StartSession", "OK"), ("CompleteSession", "ABORTED")]
    assert {e.audit_class for e in listed.entries} == {"security"}


async def test_stale_etag_is_aborted(server, idp):
    svc, me = stub(server), agent_token(idp)
    session = await create(svc, me)
    await svc.AddSessionLabels(
        pb.AddSessionLabelsRequest(session_id=session.session_id, labels=["private_data"]),
        metadata=me,
    )
    status = await expect_error(
        svc.StartSession(
            pb.StartSessionRequest(session_id=session.session_id, etag=session.etag), metadata=me
        )
    )
    assert (status.code, status.reason) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    assert (await get(svc, me, session.session_id)).state == S.SESSION_STATE_PENDING


async def test_create_validates_and_changes_nothing(server, idp):
    svc, me = stub(server), agent_token(idp)
    bad = [
        ({"ttl": seconds(10**9)}, "ttl"),
        ({"labels": ["Not A Label"]}, "labels"),
        ({"role": "r" * 200}, "role"),
        ({"agent_id": "someone-else"}, "agent_id"),
    ]
    for fields, field in bad:
        status = await expect_error(create(svc, me, **fields))
        assert status.code is grpc.StatusCode.INVALID_ARGUMENT, field
        assert [f for f, _ in status.field_violations] == [field]
    nan = struct_pb2.Struct()
    nan.update({"score": float("nan")})
    nul = struct_pb2.Struct()
    nul.update({"note": "a\x00b"})
    for fields, field in (
        ({"role": "a\x00b"}, "role"),
        ({"metadata": nan}, "metadata"),
        ({"metadata": nul}, "metadata"),
    ):
        status = await expect_error(create(svc, me, **fields))
        assert status.code is grpc.StatusCode.INVALID_ARGUMENT, field
        assert [f for f, _ in status.field_violations] == [field]
    filtered = await expect_error(
        svc.ListSessions(pb.ListSessionsRequest(agent_id="a\x00"), metadata=me)
    )
    assert filtered.code is grpc.StatusCode.INVALID_ARGUMENT  # never INTERNAL
    far = timestamp_pb2.Timestamp(seconds=10**13)
    too_late = await expect_error(
        svc.ListSessions(pb.ListSessionsRequest(created_after=far), metadata=me)
    )
    assert too_late.field_violations[0][0] == "created_after"
    missing = await expect_error(create(svc, me, parent_session_id=str(uuid.uuid4())))
    assert missing.code is grpc.StatusCode.NOT_FOUND
    listed = await svc.ListSessions(pb.ListSessionsRequest(), metadata=me)
    assert list(listed.sessions) == []
    user = bearer(idp.token(sub="user-1", ptype="user"))
    status = await expect_error(create(svc, user))
    assert status.field_violations == [("agent_id", "required unless the caller is an agent")]
    no_id = await expect_error(svc.CreateSession(pb.CreateSessionRequest(), metadata=me))
    assert no_id.reason == "IDEMPOTENCY_KEY_REQUIRED"


async def test_create_is_exactly_once_per_request_id(server, idp):
    svc, me = stub(server), agent_token(idp)
    request = pb.CreateSessionRequest(request_id=str(uuid.uuid4()), role="coder")
    first = (await svc.CreateSession(request, metadata=me)).session
    again = (await svc.CreateSession(request, metadata=me)).session
    assert again == first
    second_agent = agent_token(idp, agent="agent-8")
    taken = await expect_error(svc.CreateSession(request, metadata=second_agent))
    assert taken.code is grpc.StatusCode.ALREADY_EXISTS
    listed = await svc.ListSessions(pb.ListSessionsRequest(), metadata=me)
    assert [s.session_id for s in listed.sessions] == [first.session_id]


async def test_racing_creates_with_one_request_id_make_one_session(server):
    """The store's create is one statement without an explicit transaction: twenty racing
    inserts of one request id (as retries landing on processes whose replay cache missed) make
    one session and one first revision, and every caller gets that session."""
    now = time.time()
    new = NewSession(
        tenant_id=TENANT,
        agent_id=AGENT,
        user_id=None,
        role="coder",
        parent_session_id=None,
        task="",
        metadata={},
        labels=(),
        created_by=AGENT,
        created_at=now,
        expires_at=now + 3600,
        request_id=str(uuid.uuid4()),
    )
    store = server.app.sessions._store
    results = await asyncio.gather(*(store.create_session(new) for _ in range(20)))
    assert sum(created for _, created in results) == 1
    assert len({session.id for session, _ in results}) == 1
    assert len(await store.revisions(TENANT, results[0][0].id, 0)) == 1


async def test_retry_without_the_replay_cache_still_returns_the_first_session(start_server, idp):
    """The replay cache is gone (another Redis prefix: Redis lost) and the parent has ended
    since the first calls: their retries still return what they created, not an error."""
    async with (
        start_server() as first,
        start_server(TRUSTPLANE_CACHE_PREFIX=f"lost:{uuid.uuid4().hex}:") as second,
    ):
        me = agent_token(idp)
        parent = await create(stub(first), me)
        request = pb.CreateSessionRequest(
            request_id=str(uuid.uuid4()), parent_session_id=parent.session_id
        )
        child = (await stub(first).CreateSession(request, metadata=me)).session
        hand_off = pb.CreateTaskRequest(
            request_id=str(uuid.uuid4()),
            session_id=parent.session_id,
            type="review",
            from_role="coder",
            to_role="reviewer",
        )
        task = (await stub(first).CreateTask(hand_off, metadata=me)).task
        ask = pb.RequestApprovalRequest(
            request_id=str(uuid.uuid4()),
            session_id=parent.session_id,
            action_digest=b"d" * 32,
            approver_roles=["security"],
        )
        approval = (await stub(first).RequestApproval(ask, metadata=me)).approval
        await stub(first).CancelSession(
            pb.CancelSessionRequest(session_id=parent.session_id), metadata=me
        )
        retried = (await stub(second).CreateSession(request, metadata=me)).session
        assert retried == child
        assert (await stub(second).CreateTask(hand_off, metadata=me)).task == task
        assert (await stub(second).RequestApproval(ask, metadata=me)).approval == approval
        fresh = await expect_error(create(stub(second), me, parent_session_id=parent.session_id))
        assert fresh.reason == "SESSION_TERMINAL"  # a new request id is refused as it should


async def test_update_mask_etag_and_labels_only_grow(server, idp):
    svc, me = stub(server), agent_token(idp)
    session = await create(svc, me, labels=["untrusted_input"])
    change = pb.AgentSession(session_id=session.session_id, etag=session.etag)
    change.metadata.update({"step": 2})
    change.labels.extend(["untrusted_input", "private_data"])
    mask = field_mask_pb2.FieldMask(paths=["metadata", "labels"])
    updated = (
        await svc.UpdateSession(
            pb.UpdateSessionRequest(session=change, update_mask=mask), metadata=me
        )
    ).session
    assert list(updated.labels) == ["private_data", "untrusted_input"]
    assert updated.metadata["step"] == 2 and updated.revision == 2
    stale = await expect_error(
        svc.UpdateSession(pb.UpdateSessionRequest(session=change, update_mask=mask), metadata=me)
    )
    assert stale.reason == "ETAG_MISMATCH"
    shrink = pb.AgentSession(session_id=session.session_id, labels=["private_data"])
    status = await expect_error(
        svc.UpdateSession(
            pb.UpdateSessionRequest(
                session=shrink, update_mask=field_mask_pb2.FieldMask(paths=["labels"])
            ),
            metadata=me,
        )
    )
    assert status.field_violations == [
        ("session.labels", "labels can only be added, never removed")
    ]
    bad_mask = await expect_error(
        svc.UpdateSession(
            pb.UpdateSessionRequest(
                session=shrink, update_mask=field_mask_pb2.FieldMask(paths=["state"])
            ),
            metadata=me,
        )
    )
    assert bad_mask.field_violations[0][0] == "update_mask"
    added = (
        await svc.AddSessionLabels(
            pb.AddSessionLabelsRequest(session_id=session.session_id, labels=["pii", "pii"]),
            metadata=me,
        )
    ).session
    assert list(added.labels) == ["pii", "private_data", "untrusted_input"]
    same = (
        await svc.AddSessionLabels(
            pb.AddSessionLabelsRequest(session_id=session.session_id, labels=["pii"]), metadata=me
        )
    ).session
    assert same.revision == added.revision  # nothing new, no new revision
    await svc.CancelSession(pb.CancelSessionRequest(session_id=session.session_id), metadata=me)
    ended = await expect_error(
        svc.AddSessionLabels(
            pb.AddSessionLabelsRequest(session_id=session.session_id, labels=["late"]),
            metadata=me,
        )
    )
    assert (ended.code, ended.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SESSION_TERMINAL")


async def test_only_involved_principals_or_admins_change_a_session(server, idp):
    svc = stub(server)
    session = await create(svc, agent_token(idp))
    stranger = agent_token(idp, agent="agent-9")
    status = await expect_error(
        svc.CancelSession(pb.CancelSessionRequest(session_id=session.session_id), metadata=stranger)
    )
    assert status.code is grpc.StatusCode.PERMISSION_DENIED
    assert (await get(svc, stranger, session.session_id)).state == S.SESSION_STATE_PENDING
    admin = bearer(idp.token(sub="admin-1", ptype="user", roles=["admin"]))
    await svc.CancelSession(pb.CancelSessionRequest(session_id=session.session_id), metadata=admin)


async def test_list_filters_and_pages(server, idp):
    svc = stub(server)
    mine, other = agent_token(idp), agent_token(idp, agent="agent-8")
    ids = [(await create(svc, mine)).session_id for _ in range(5)]
    theirs = await create(svc, other)
    await svc.StartSession(pb.StartSessionRequest(session_id=ids[0]), metadata=mine)
    seen, token = [], ""
    while True:
        page = await svc.ListSessions(
            pb.ListSessionsRequest(page_size=2, page_token=token, agent_id=AGENT), metadata=mine
        )
        seen += [s.session_id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids[::-1]
    active = await svc.ListSessions(
        pb.ListSessionsRequest(state=S.SESSION_STATE_ACTIVE), metadata=mine
    )
    assert [s.session_id for s in active.sessions] == [ids[0]]
    later = theirs.create_time
    newest = await svc.ListSessions(pb.ListSessionsRequest(created_after=later), metadata=mine)
    assert [s.session_id for s in newest.sessions] == [theirs.session_id]
    older = await svc.ListSessions(pb.ListSessionsRequest(created_before=later), metadata=mine)
    assert theirs.session_id not in [s.session_id for s in older.sessions]
    first = await svc.ListSessions(pb.ListSessionsRequest(page_size=1), metadata=mine)
    unknown = await expect_error(svc.ListSessions(pb.ListSessionsRequest(state=42), metadata=mine))
    assert unknown.field_violations == [("state", "not a known state")]
    forged = await expect_error(
        svc.ListSessions(
            pb.ListSessionsRequest(page_size=1, page_token=first.next_page_token, agent_id="x"),
            metadata=mine,
        )
    )
    assert forged.reason == "PAGE_TOKEN_INVALID"


async def test_ending_a_session_revokes_only_its_own_tenants_tokens(server, idp):
    """The deny-list entry of an agent session is per tenant (`rv:asid:<tenant>:<id>`): a token
    of another tenant carrying the same `asid` names another tenant's session and stays valid."""
    svc, me = stub(server), agent_token(idp)
    ended = await create(svc, me)

    def bound(tenant):
        claims = {"act": {"sub": AGENT, "ptype": "agent"}, "asid": ended.session_id}
        return bearer(idp.token(sub="user-1", ptype="user", tid=tenant, **claims))

    ours, theirs = bound(TENANT), bound(OTHER_TENANT)
    await svc.CancelSession(pb.CancelSessionRequest(session_id=ended.session_id), metadata=me)
    revoked = await expect_error(get(svc, ours, ended.session_id))
    assert (revoked.code, revoked.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
    elsewhere = await expect_error(get(svc, theirs, ended.session_id))
    assert (elsewhere.code, elsewhere.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")


async def test_expiry_lazy_and_by_sweeper_then_purge(start_server, idp, database_url):
    now = [time.time()]
    month = str(30 * 86_400)
    async with start_server(clock=lambda: now[0], TRUSTPLANE_SESSION_MAX_TTL=month) as server:
        svc, me = stub(server), agent_token(idp)
        lazy = await create(svc, me, ttl=seconds(60))
        swept = await create(svc, me, ttl=seconds(60))
        kept = await create(svc, me, ttl=seconds(20 * 86_400))
        await svc.StartSession(pb.StartSessionRequest(session_id=swept.session_id), metadata=me)
        bound = bearer(
            idp.token(
                sub="user-1",
                ptype="user",
                act={"sub": AGENT, "ptype": "agent"},
                asid=swept.session_id,
                exp=int(time.time()) + 3600,
            )
        )
        assert (await get(svc, bound, kept.session_id)).session_id == kept.session_id
        now[0] += 61
        expired = await get(svc, me, lazy.session_id)  # lazily, on read
        assert expired.state == S.SESSION_STATE_EXPIRED and expired.end_time.seconds > 0
        listed = await svc.ListSessions(
            pb.ListSessionsRequest(state=S.SESSION_STATE_EXPIRED), metadata=me
        )
        assert {s.session_id for s in listed.sessions} == {lazy.session_id, swept.session_id}
        assert {s.state for s in listed.sessions} == {S.SESSION_STATE_EXPIRED}
        active = await svc.ListSessions(
            pb.ListSessionsRequest(state=S.SESSION_STATE_ACTIVE), metadata=me
        )
        assert list(active.sessions) == []  # past its expiry: not ACTIVE any more
        conn = await asyncpg.connect(database_url)
        try:
            state = "SELECT state FROM agent_sessions WHERE id = $1"
            assert await conn.fetchval(state, uuid.UUID(swept.session_id)) == "ACTIVE"
            await server.app.sessions.sweep()
            assert await conn.fetchval(state, uuid.UUID(swept.session_id)) == "EXPIRED"
            revoked_token = await expect_error(get(svc, bound, kept.session_id))
            assert (revoked_token.code, revoked_token.reason) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "TOKEN_REVOKED",
            )
            revoked = await conn.fetchval(
                "SELECT count(*) FROM agent_sessions WHERE tokens_revoked_at IS NOT NULL"
            )
            assert revoked == 2
            now[0] += 6 * 86_400  # within retention: kept
            await server.app.sessions.sweep()
            assert (await get(svc, me, swept.session_id)).state == S.SESSION_STATE_EXPIRED
            now[0] += 86_400 + 1  # past the 7-day retention
            await server.app.sessions.sweep()
            for gone in (lazy, swept):
                status = await expect_error(get(svc, me, gone.session_id))
                assert status.code is grpc.StatusCode.NOT_FOUND
            events = await conn.fetchval("SELECT count(*) FROM agent_session_events")
            assert events == 1  # only the live session's own first revision is left
        finally:
            await conn.close()
        assert (await get(svc, me, kept.session_id)).state == S.SESSION_STATE_PENDING


async def test_cross_tenant_ids_are_not_found(server, idp):
    svc, me = stub(server), agent_token(idp)
    session = await create(svc, me)
    task = (
        await svc.CreateTask(
            pb.CreateTaskRequest(
                request_id=str(uuid.uuid4()),
                session_id=session.session_id,
                type="review",
                from_role="coder",
                to_role="reviewer",
            ),
            metadata=me,
        )
    ).task
    approval = (
        await svc.RequestApproval(
            pb.RequestApprovalRequest(
                request_id=str(uuid.uuid4()),
                session_id=session.session_id,
                action_digest=b"d" * 32,
                approver_roles=["admin"],
            ),
            metadata=me,
        )
    ).approval
    them = bearer(idp.token(sub=AGENT, ptype="agent", tid=OTHER_TENANT, roles=["owner"]))
    sid, tid, aid = session.session_id, task.task_id, approval.approval_id
    calls = [
        svc.GetSession(pb.GetSessionRequest(session_id=sid), metadata=them),
        svc.StartSession(pb.StartSessionRequest(session_id=sid), metadata=them),
        svc.CancelSession(pb.CancelSessionRequest(session_id=sid), metadata=them),
        svc.AddSessionLabels(
            pb.AddSessionLabelsRequest(session_id=sid, labels=["x"]), metadata=them
        ),
        svc.ListTasks(pb.ListTasksRequest(session_id=sid), metadata=them),
        svc.GetTask(pb.GetTaskRequest(task_id=tid), metadata=them),
        svc.UpdateTaskState(
            pb.UpdateTaskStateRequest(task_id=tid, state=pb.TASK_STATE_CANCELLED), metadata=them
        ),
        svc.GetApproval(pb.GetApprovalRequest(approval_id=aid), metadata=them),
        svc.ApproveApproval(pb.ApproveApprovalRequest(approval_id=aid), metadata=them),
        svc.DenyApproval(pb.DenyApprovalRequest(approval_id=aid), metadata=them),
        create(svc, them, parent_session_id=sid),
    ]
    for call in calls:
        status = await expect_error(call)
        assert (status.code, status.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    for watch in (
        svc.WatchSession(pb.WatchSessionRequest(session_id=sid), metadata=them),
        svc.WatchApproval(pb.WatchApprovalRequest(approval_id=aid), metadata=them),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in watch:
                pass
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    listed = await svc.ListSessions(pb.ListSessionsRequest(), metadata=them)
    assert list(listed.sessions) == []
    assert (await get(svc, me, sid)).state == S.SESSION_STATE_PENDING


async def test_tasks_hand_off_between_roles(server, idp):
    svc, me = stub(server), agent_token(idp)
    session = await create(svc, me)
    payload = struct_pb2.Struct()
    payload.update({"diff": "--- a\n+++ b", "files": ["x.py"]})
    request = pb.CreateTaskRequest(
        request_id=str(uuid.uuid4()),
        session_id=session.session_id,
        type="code_review",
        from_role="coder",
        to_role="reviewer",
        payload=payload,
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
    )
    task = (await svc.CreateTask(request, metadata=me)).task
    assert task.state == pb.TASK_STATE_PENDING and task.payload["files"][0] == "x.py"
    assert (await svc.CreateTask(request, metadata=me)).task == task  # the same request id
    others = [
        (
            await svc.CreateTask(
                pb.CreateTaskRequest(
                    request_id=str(uuid.uuid4()),
                    session_id=session.session_id,
                    type="test",
                    from_role="coder",
                    to_role="tester",
                ),
                metadata=me,
            )
        ).task.task_id
        for _ in range(3)
    ]
    seen, token = [], ""
    while True:
        page = await svc.ListTasks(
            pb.ListTasksRequest(session_id=session.session_id, page_size=2, page_token=token),
            metadata=me,
        )
        seen += [t.task_id for t in page.tasks]
        token = page.next_page_token
        if not token:
            break
    assert seen == [task.task_id, *others]
    for_reviewer = await svc.ListTasks(
        pb.ListTasksRequest(session_id=session.session_id, to_role="reviewer"), metadata=me
    )
    assert [t.task_id for t in for_reviewer.tasks] == [task.task_id]

    async def move(state, **kw):
        return (
            await svc.UpdateTaskState(
                pb.UpdateTaskStateRequest(task_id=task.task_id, state=state, **kw), metadata=me
            )
        ).task

    bad = await expect_error(move(pb.TASK_STATE_COMPLETED))
    assert (bad.code, bad.reason, bad.metadata["state"]) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "TASK_INVALID_TRANSITION",
        "PENDING",
    )
    working = await move(pb.TASK_STATE_IN_PROGRESS, etag=task.etag)
    stale = await expect_error(move(pb.TASK_STATE_COMPLETED, etag=task.etag))
    assert stale.reason == "ETAG_MISMATCH"
    done = await move(pb.TASK_STATE_COMPLETED, status_message="lgtm", etag=working.etag)
    assert done.state == pb.TASK_STATE_COMPLETED and done.status_message == "lgtm"
    final = await expect_error(move(pb.TASK_STATE_CANCELLED))
    assert final.metadata["state"] == "COMPLETED"
    invalid = await expect_error(
        svc.CreateTask(
            pb.CreateTaskRequest(request_id=str(uuid.uuid4()), session_id=session.session_id),
            metadata=me,
        )
    )
    assert {f for f, _ in invalid.field_violations} == {"type", "from_role", "to_role"}
    await svc.CancelSession(pb.CancelSessionRequest(session_id=session.session_id), metadata=me)
    request.request_id = str(uuid.uuid4())
    ended = await expect_error(svc.CreateTask(request, metadata=me))
    assert ended.reason == "SESSION_TERMINAL"


# --- watch ---------------------------------------------------------------------------------


async def _collect(call, count, into, first):
    async for message in call:
        into.append(message.session)
        first.set()
        if len(into) == count:
            return


async def _make_changes(svc, me, session_id):
    await svc.AddSessionLabels(
        pb.AddSessionLabelsRequest(session_id=session_id, labels=["untrusted_input"]), metadata=me
    )
    await svc.StartSession(pb.StartSessionRequest(session_id=session_id), metadata=me)
    await svc.AddSessionLabels(
        pb.AddSessionLabelsRequest(session_id=session_id, labels=["private_data"]), metadata=me
    )
    await svc.CompleteSession(pb.CompleteSessionRequest(session_id=session_id), metadata=me)


@pytest.mark.parametrize("cache", ["redis", "memory"])
async def test_watch_sees_every_change_in_order(start_server, idp, cache):
    async with start_server(**({"REDIS_URL": ""} if cache == "memory" else {})) as server:
        await _watch_in_order(server, idp)


async def _watch_in_order(server, idp):
    svc, me = stub(server), agent_token(idp)
    session = await create(svc, me)
    seen: list[pb.AgentSession] = []
    watch = svc.WatchSession(pb.WatchSessionRequest(session_id=session.session_id), metadata=me)
    first = asyncio.Event()
    watcher = asyncio.ensure_future(_collect(watch, 5, seen, first))
    await asyncio.wait_for(first.wait(), 10)
    await _make_changes(svc, me, session.session_id)
    await asyncio.wait_for(watcher, 10)
    assert [s.revision for s in seen] == [1, 2, 3, 4, 5]
    assert [S.Name(s.state)[14:] for s in seen] == [
        "PENDING",
        "PENDING",
        "ACTIVE",
        "ACTIVE",
        "COMPLETED",
    ]
    assert list(seen[3].labels) == ["private_data", "untrusted_input"]
    # A late watcher gets the current state, and the stream ends (the session has ended).
    late = [
        m.session
        async for m in svc.WatchSession(
            pb.WatchSessionRequest(session_id=session.session_id), metadata=me
        )
    ]
    assert [s.revision for s in late] == [5]
    resumed = [
        m.session
        async for m in svc.WatchSession(
            pb.WatchSessionRequest(session_id=session.session_id, after_revision=2), metadata=me
        )
    ]
    assert [s.revision for s in resumed] == [3, 4, 5]


async def test_watch_across_server_processes(start_server, idp):
    me = agent_token(idp)
    seen: list[pb.AgentSession] = []
    # A long poll: only a cross-process notification can deliver changes in time.
    async with (
        start_server() as running,
        app_process(running.app.config, TRUSTPLANE_SESSION_WATCH_POLL="60") as port,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        remote = session_pb2_grpc.SessionServiceStub(channel)
        session = await create(remote, me)
        watch = remote.WatchSession(
            pb.WatchSessionRequest(session_id=session.session_id), metadata=me
        )
        first = asyncio.Event()
        watcher = asyncio.ensure_future(_collect(watch, 5, seen, first))
        await asyncio.wait_for(first.wait(), 10)
        started = time.monotonic()
        await _make_changes(stub(running), me, session.session_id)  # the other process
        await asyncio.wait_for(watcher, 20)
        assert time.monotonic() - started < 20
    assert [s.revision for s in seen] == [1, 2, 3, 4, 5]
    assert seen[-1].state == S.SESSION_STATE_COMPLETED


# --- delegation ----------------------------------------------------------------------------


async def test_delegated_token_dies_with_its_agent_session(server):
    _, owner, password = await server.app.auth.bootstrap("acme", "owner@acme.test")
    login = await server.auth.Login(
        auth_pb2.LoginRequest(tenant="acme", email="owner@acme.test", password=password)
    )
    user_token = login.tokens.access_token
    me = bearer(user_token)

    async def agent_key():
        agent = (
            await server.auth.CreateAgent(
                auth_pb2.CreateAgentRequest(
                    request_id=str(uuid.uuid4()), display_name="helper", roles=["member"]
                ),
                metadata=me,
            )
        ).agent
        key = await server.auth.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                request_id=str(uuid.uuid4()),
                principal_id=agent.agent_id,
                expire_time=_later(3600),
            ),
            metadata=me,
        )
        return agent, key.api_key

    agent, key = await agent_key()
    _, other_key = await agent_key()
    svc = stub(server)
    session = await create(svc, bearer(key), role="coder")  # the agent's own credential
    assert session.agent_id == agent.agent_id and session.user_id == ""
    for_me = await create(svc, me, agent_id=agent.agent_id)  # a user, for an agent it owns
    assert for_me.agent_id == agent.agent_id and for_me.user_id == owner.id

    def exchange(actor_key, agent_session_id):
        return server.auth.ExchangeToken(
            auth_pb2.ExchangeTokenRequest(
                subject_token=user_token,
                actor_token=actor_key,
                scopes=["auth.whoami", "sessions.create", "sessions.update"],
                agent_session_id=agent_session_id,
            )
        )

    for wrong in (str(uuid.uuid4()), "nonsense"):
        status = await expect_error(exchange(key, wrong))
        assert (status.code, status.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "AGENT_SESSION_INVALID",
        )
    not_theirs = await expect_error(exchange(other_key, session.session_id))
    assert not_theirs.reason == "AGENT_SESSION_INVALID"
    delegated = bearer((await exchange(key, session.session_id)).access_token)
    who = await server.auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=delegated)
    assert who.actor.act.subject_id == agent.agent_id
    # Acting for the user: the session's agent is the actor, its user the delegating subject.
    sub = await create(svc, delegated, parent_session_id=session.session_id)
    assert (sub.agent_id, sub.user_id) == (agent.agent_id, owner.id)
    await svc.StartSession(
        pb.StartSessionRequest(session_id=session.session_id), metadata=delegated
    )
    await svc.CompleteSession(pb.CompleteSessionRequest(session_id=session.session_id), metadata=me)
    status = await expect_error(server.auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=delegated))
    assert (status.code, status.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
    ended = await expect_error(exchange(key, session.session_id))
    assert ended.reason == "AGENT_SESSION_INVALID"
    # The user's own token and the agent's key are untouched.
    await server.auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=me)
    await server.auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(key))
    foreign = await expect_error(create(svc, me, agent_id=str(uuid.uuid4())))
    assert foreign.code is grpc.StatusCode.NOT_FOUND


async def test_a_session_for_someone_elses_agent_is_refused(server, idp):
    tenant, _, password = await server.app.auth.bootstrap("acme", "owner@acme.test")
    login = await server.auth.Login(
        auth_pb2.LoginRequest(tenant="acme", email="owner@acme.test", password=password)
    )
    owner = bearer(login.tokens.access_token)
    agent = (
        await server.auth.CreateAgent(
            auth_pb2.CreateAgentRequest(request_id=str(uuid.uuid4()), display_name="helper"),
            metadata=owner,
        )
    ).agent
    svc = stub(server)
    mallory = bearer(idp.token(sub="mallory", roles=["member"], tid=tenant))
    status = await expect_error(create(svc, mallory, agent_id=agent.agent_id))
    assert (status.code, status.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    listed = await svc.ListSessions(pb.ListSessionsRequest(), metadata=owner)
    assert list(listed.sessions) == []  # nothing was created
    # Its owner may, and so may an admin of the tenant (any agent).
    assert (await create(svc, owner, agent_id=agent.agent_id)).agent_id == agent.agent_id
    admin = bearer(idp.token(sub="ada", roles=["admin"], tid=tenant))
    assert (await create(svc, admin, agent_id=agent.agent_id)).agent_id == agent.agent_id


async def test_a_revocation_the_cache_missed_is_written_by_the_sweeper(
    start_server, idp, database_url
):
    """Redis (started by this test) goes away while a session expires: the expiry stands, the
    revocation is deferred, bound tokens cannot be checked at all meanwhile (fail closed), and
    once Redis is back the sweeper writes the entry, after which the token is revoked."""
    port = services.free_port()
    redis = contextlib.ExitStack()
    redis.enter_context(services.redis_server(port))
    now = [time.time()]
    try:
        async with start_server(
            clock=lambda: now[0],
            REDIS_URL=f"redis://127.0.0.1:{port}/0",
            TRUSTPLANE_REVOCATION_STALENESS="0",
        ) as server:
            svc, me = stub(server), agent_token(idp)
            session = await create(svc, me, ttl=seconds(60))
            claims = {"act": {"sub": AGENT, "ptype": "agent"}, "asid": session.session_id}
            bound = bearer(idp.token(sub="user-1", ptype="user", **claims))
            assert (await get(svc, bound, session.session_id)).session_id == session.session_id
            redis.close()  # Redis is gone
            now[0] += 61
            await server.app.sessions.sweep()
            conn = await asyncpg.connect(database_url)
            try:
                row = await conn.fetchrow(
                    "SELECT state, tokens_revoked_at FROM agent_sessions WHERE id = $1",
                    uuid.UUID(session.session_id),
                )
                assert (row["state"], row["tokens_revoked_at"]) == ("EXPIRED", None)
                down = await expect_error(get(svc, bound, session.session_id))
                assert down.code is grpc.StatusCode.UNAVAILABLE  # never accepted meanwhile
                redis.enter_context(services.redis_server(port))  # back, empty
                await server.app.sessions.sweep()
                revoked_at = await conn.fetchval(
                    "SELECT tokens_revoked_at FROM agent_sessions WHERE id = $1",
                    uuid.UUID(session.session_id),
                )
                assert revoked_at is not None
            finally:
                await conn.close()
            status = await expect_error(get(svc, bound, session.session_id))
            assert (status.code, status.reason) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "TOKEN_REVOKED",
            )
            events = await session_events(server, idp, session.session_id)
            assert [(e.event_type, dict(e.attributes)) for e in events] == [
                ("session.expired", {"trigger": "sweep", "agent_id": AGENT, "state": "EXPIRED"}),
                ("session.tokens_revoked", {"deferred": "true"}),
            ]
    finally:
        redis.close()


def _later(seconds_from_now):
    stamp = timestamp_pb2.Timestamp()
    stamp.FromSeconds(int(time.time()) + seconds_from_now)
    return stamp


async def test_watch_loses_nothing_when_notifications_are_lost(start_server, idp):
    """The changing server publishes on another cache prefix, so the watcher's server never
    hears of the changes: it must find every revision by re-reading PostgreSQL."""
    async with (
        start_server(TRUSTPLANE_SESSION_WATCH_POLL="0.2") as watching,
        start_server(TRUSTPLANE_CACHE_PREFIX=f"other:{uuid.uuid4().hex}:") as changing,
    ):
        me = agent_token(idp)
        session = await create(stub(watching), me)
        seen: list[pb.AgentSession] = []
        first = asyncio.Event()
        watch = stub(watching).WatchSession(
            pb.WatchSessionRequest(session_id=session.session_id), metadata=me
        )
        watcher = asyncio.ensure_future(_collect(watch, 5, seen, first))
        await asyncio.wait_for(first.wait(), 10)
        await _make_changes(stub(changing), me, session.session_id)
        await asyncio.wait_for(watcher, 10)
    assert [s.revision for s in seen] == [1, 2, 3, 4, 5]
    assert seen[-1].state == S.SESSION_STATE_COMPLETED


async def test_shutdown_ends_open_watch_streams_cleanly(start_server, idp):
    async with start_server(TRUSTPLANE_GRACE_PERIOD="30") as running:
        svc, me = stub(running), agent_token(idp)
        session = await create(svc, me)
        seen: list[pb.AgentSession] = []
        first = asyncio.Event()
        watch = svc.WatchSession(pb.WatchSessionRequest(session_id=session.session_id), metadata=me)
        watcher = asyncio.ensure_future(_collect(watch, 2, seen, first))
        await asyncio.wait_for(first.wait(), 10)
        started = time.monotonic()
        await running.app.stop()
        assert time.monotonic() - started < 10  # not the 30 s grace period
        await asyncio.wait_for(watcher, 5)  # ended with OK: the client resumes elsewhere
        assert await watch.code() is grpc.StatusCode.OK
    assert [s.revision for s in seen] == [1]


async def test_a_change_drops_only_that_sessions_read_in_flight(start_server, idp, monkeypatch):
    """A read of one session in flight while another session changes is still kept (and
    shared); a read in flight while its own session changes is not."""
    async with start_server(TRUSTPLANE_SESSION_READ_TTL="60") as server:
        svc, me = stub(server), agent_token(idp)
        changed, bystander = await create(svc, me), await create(svc, me)
        sessions = server.app.sessions
        reads: list[str] = []
        gate, started = asyncio.Event(), asyncio.Event()
        real = sessions._store.session

        async def held(tenant_id, session_id):
            reads.append(session_id)
            if len(reads) <= 2:  # the two shared reads wait; the change's own reads do not
                if len(reads) == 2:
                    started.set()
                await gate.wait()
            return await real(tenant_id, session_id)

        monkeypatch.setattr(sessions._store, "session", held)
        both = asyncio.gather(
            sessions.session_for_policy(TENANT, bystander.session_id),
            sessions.session_for_policy(TENANT, changed.session_id),
        )
        await asyncio.wait_for(started.wait(), 10)
        await svc.AddSessionLabels(  # a change while both reads are in flight
            pb.AddSessionLabelsRequest(session_id=changed.session_id, labels=["untrusted_input"]),
            metadata=me,
        )
        gate.set()
        await both
        await sessions.session_for_policy(TENANT, bystander.session_id)
        await sessions.session_for_policy(TENANT, changed.session_id)
        assert reads.count(bystander.session_id) == 1  # kept
        # Read again after its change (the change itself may read it too, unshared).
        assert reads[-1] == changed.session_id and reads.count(changed.session_id) >= 2
