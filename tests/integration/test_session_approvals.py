"""Approvals through the real server: who may decide, single-use tokens bound to the digest,
principal and session, expiry, watching instead of polling."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid

import grpc
from google.protobuf import duration_pb2
from trustplane.session.v1 import session_pb2 as pb
from trustplane.session.v1 import session_pb2_grpc

from tests.support.status import expect_error
from tests.support.tokens import bearer

DIGEST = hashlib.sha256(b'{"tool":"shell.exec","args":["rm","-rf","/tmp/x"]}').digest()
A = pb.ApprovalState


def stub(running):
    return session_pb2_grpc.SessionServiceStub(running.channel)


def people(idp):
    """The requesting agent, a security approver, an admin without the role, a requester
    that is also an approver (to try approving its own request)."""
    return (
        bearer(idp.token(sub="agent-1", ptype="agent")),
        bearer(idp.token(sub="alice", ptype="user", roles=["admin", "security"])),
        bearer(idp.token(sub="bob", ptype="user", roles=["admin"])),
        bearer(idp.token(sub="carol", ptype="user", roles=["admin", "security"])),
    )


async def request(svc, credentials, session_id="", ttl=None, roles=("security",)):
    message = pb.RequestApprovalRequest(
        request_id=str(uuid.uuid4()),
        session_id=session_id,
        action_digest=DIGEST,
        action="shell.exec rm -rf /tmp/x",
        reason="destructive command",
        approver_roles=list(roles),
    )
    if ttl is not None:
        message.ttl.CopyFrom(duration_pb2.Duration(seconds=ttl))
    return (await svc.RequestApproval(message, metadata=credentials)).approval


async def session_of(svc, agent):
    created = await svc.CreateSession(
        pb.CreateSessionRequest(request_id=str(uuid.uuid4())), metadata=agent
    )
    return created.session.session_id


def redeem(svc, credentials, token, digest=DIGEST, session_id=""):
    return svc.RedeemApproval(
        pb.RedeemApprovalRequest(approval_token=token, action_digest=digest, session_id=session_id),
        metadata=credentials,
    )


async def test_approve_and_redeem_exactly_once(server, idp):
    svc = stub(server)
    agent, alice, bob, _ = people(idp)
    session_id = await session_of(svc, agent)
    approval = await request(svc, agent, session_id)
    assert approval.state == A.APPROVAL_STATE_PENDING and approval.requester_id == "agent-1"
    waiting = await svc.ListApprovals(pb.ListApprovalsRequest(awaiting_me=True), metadata=alice)
    assert [a.approval_id for a in waiting.approvals] == [approval.approval_id]
    for_bob = await svc.ListApprovals(pb.ListApprovalsRequest(awaiting_me=True), metadata=bob)
    assert list(for_bob.approvals) == []  # not one of the approver roles
    robot = bearer(idp.token(sub="agent-3", ptype="agent", roles=["admin", "security"]))
    for_robot = await svc.ListApprovals(pb.ListApprovalsRequest(awaiting_me=True), metadata=robot)
    assert list(for_robot.approvals) == []  # the role, but not a person
    wrong_role = await expect_error(
        svc.ApproveApproval(
            pb.ApproveApprovalRequest(approval_id=approval.approval_id), metadata=bob
        )
    )
    assert (wrong_role.code, wrong_role.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "APPROVER_ROLE_MISSING",
    )
    approved = await svc.ApproveApproval(
        pb.ApproveApprovalRequest(approval_id=approval.approval_id, note="ok, scratch dir"),
        metadata=alice,
    )
    token = approved.approval_token
    assert token.startswith("tpap_") and approved.approval.decided_by == "alice"
    assert approved.approval.state == A.APPROVAL_STATE_APPROVED
    read = await svc.GetApproval(
        pb.GetApprovalRequest(approval_id=approval.approval_id), metadata=agent
    )
    assert token not in str(read) and read.approval.decision_note == "ok, scratch dir"
    again = await expect_error(
        svc.ApproveApproval(
            pb.ApproveApprovalRequest(approval_id=approval.approval_id), metadata=alice
        )
    )
    assert (again.code, again.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "APPROVAL_NOT_PENDING",
    )
    # Bound to its digest, its principal and its session; none of these spends it.
    other_digest = await expect_error(
        redeem(svc, agent, token, hashlib.sha256(b"other").digest(), session_id)
    )
    assert (other_digest.code, other_digest.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "APPROVAL_DIGEST_MISMATCH",
    )
    someone_else = bearer(idp.token(sub="agent-2", ptype="agent"))
    stolen = await expect_error(redeem(svc, someone_else, token, session_id=session_id))
    assert stolen.reason == "APPROVAL_BINDING_MISMATCH"
    no_session = await expect_error(redeem(svc, agent, token))
    assert no_session.reason == "APPROVAL_BINDING_MISMATCH"
    garbage = await expect_error(redeem(svc, agent, "tpap_" + "A" * 43, session_id=session_id))
    assert (garbage.code, garbage.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "APPROVAL_TOKEN_INVALID",
    )
    spent = await redeem(svc, agent, token, session_id=session_id)
    assert spent.approval.redeem_time.seconds > 0
    twice = await expect_error(redeem(svc, agent, token, session_id=session_id))
    assert (twice.code, twice.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "APPROVAL_TOKEN_REDEEMED",
    )


async def test_redeem_races_once_and_python_entry_point(server, idp):
    """The method the Policy service calls: 20 concurrent redemptions, exactly one wins."""
    svc = stub(server)
    agent, alice, _, _ = people(idp)
    approval = await request(svc, agent)
    token = (
        await svc.ApproveApproval(
            pb.ApproveApprovalRequest(approval_id=approval.approval_id), metadata=alice
        )
    ).approval_token
    sessions = server.app.sessions
    tenant = idp.claims()["tid"]
    attempts = [
        sessions.redeem_approval(
            tenant, token, digest=DIGEST, principal_id="agent-1", session_id=None
        )
        for _ in range(20)
    ]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    wins = [r for r in results if not isinstance(r, BaseException)]
    assert len(wins) == 1 and wins[0].id == approval.approval_id
    assert {type(r).__name__ for r in results if isinstance(r, BaseException)} == {
        "ApprovalTokenRedeemed"
    }
    other_tenant = await expect_error(
        redeem(svc, bearer(idp.token(sub="agent-1", ptype="agent", tid="t2")), token)
    )
    assert other_tenant.reason == "APPROVAL_TOKEN_INVALID"


async def test_nobody_decides_their_own_request(server, idp):
    svc = stub(server)
    agent, alice, _, carol = people(idp)
    own = await request(svc, carol)
    status = await expect_error(
        svc.ApproveApproval(pb.ApproveApprovalRequest(approval_id=own.approval_id), metadata=carol)
    )
    assert (status.code, status.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "APPROVAL_SELF_DECISION",
    )
    denied = await expect_error(
        svc.DenyApproval(pb.DenyApprovalRequest(approval_id=own.approval_id), metadata=carol)
    )
    assert denied.reason == "APPROVAL_SELF_DECISION"
    mine = await svc.ListApprovals(pb.ListApprovalsRequest(awaiting_me=True), metadata=carol)
    assert own.approval_id not in [a.approval_id for a in mine.approvals]
    # A delegated token: the user behind the agent is in the requester's chain too.
    delegated = bearer(
        idp.token(
            sub="alice",
            ptype="user",
            roles=["admin", "security"],
            act={"sub": "agent-1", "ptype": "agent"},
        )
    )
    for_alice = await request(svc, delegated)
    assert for_alice.requester_id == "agent-1"
    status = await expect_error(
        svc.ApproveApproval(
            pb.ApproveApprovalRequest(approval_id=for_alice.approval_id), metadata=alice
        )
    )
    assert status.reason == "APPROVAL_SELF_DECISION"
    for not_a_person in (
        delegated,  # alice's roles, but her agent is making the call
        bearer(idp.token(sub="agent-3", ptype="agent", roles=["admin", "security"])),
    ):
        status = await expect_error(
            svc.ApproveApproval(
                pb.ApproveApprovalRequest(approval_id=own.approval_id), metadata=not_a_person
            )
        )
        assert (status.code, status.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "PERMISSION_DENIED",
        )
    agent_itself = await expect_error(
        svc.ApproveApproval(pb.ApproveApprovalRequest(approval_id=own.approval_id), metadata=agent)
    )
    assert agent_itself.code is grpc.StatusCode.PERMISSION_DENIED  # agents hold no approve right
    still = await svc.GetApproval(
        pb.GetApprovalRequest(approval_id=own.approval_id), metadata=alice
    )
    assert still.approval.state == A.APPROVAL_STATE_PENDING


async def test_denied_approval_yields_nothing_to_redeem(server, idp):
    svc = stub(server)
    agent, alice, _, _ = people(idp)
    approval = await request(svc, agent)
    denied = await svc.DenyApproval(
        pb.DenyApprovalRequest(approval_id=approval.approval_id, note="no"), metadata=alice
    )
    assert denied.approval.state == A.APPROVAL_STATE_DENIED
    late = await expect_error(
        svc.ApproveApproval(
            pb.ApproveApprovalRequest(approval_id=approval.approval_id), metadata=alice
        )
    )
    assert late.metadata["state"] == "DENIED"


async def test_expired_approvals(start_server, idp):
    now = [time.time()]
    async with start_server(clock=lambda: now[0]) as server:
        svc = stub(server)
        agent, alice, _, _ = people(idp)
        waiting = await request(svc, agent, ttl=60)
        approved = await request(svc, agent, ttl=60)
        swept = await request(svc, agent, ttl=60)
        token = (
            await svc.ApproveApproval(
                pb.ApproveApprovalRequest(approval_id=approved.approval_id), metadata=alice
            )
        ).approval_token
        now[0] += 61
        read = await svc.GetApproval(
            pb.GetApprovalRequest(approval_id=waiting.approval_id), metadata=alice
        )
        assert read.approval.state == A.APPROVAL_STATE_EXPIRED
        late = await expect_error(
            svc.ApproveApproval(
                pb.ApproveApprovalRequest(approval_id=waiting.approval_id), metadata=alice
            )
        )
        assert (late.code, late.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "APPROVAL_NOT_PENDING",
        )
        expired_token = await expect_error(redeem(svc, agent, token))
        assert (expired_token.code, expired_token.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "APPROVAL_EXPIRED",
        )
        waiting_list = await svc.ListApprovals(
            pb.ListApprovalsRequest(awaiting_me=True), metadata=alice
        )
        assert list(waiting_list.approvals) == []
        await server.app.sessions.sweep()
        listed = await svc.ListApprovals(
            pb.ListApprovalsRequest(state=A.APPROVAL_STATE_EXPIRED), metadata=alice
        )
        assert {a.approval_id for a in listed.approvals} == {
            waiting.approval_id,
            swept.approval_id,
        }
        too_long = await expect_error(request(svc, agent, ttl=10**7))
        assert too_long.field_violations[0][0] == "ttl"


async def test_request_validates(server, idp):
    svc = stub(server)
    agent, *_ = people(idp)
    bad = pb.RequestApprovalRequest(request_id=str(uuid.uuid4()), action_digest=b"short")
    status = await expect_error(svc.RequestApproval(bad, metadata=agent))
    assert {f for f, _ in status.field_violations} == {"action_digest", "approver_roles"}
    listed = await svc.ListApprovals(pb.ListApprovalsRequest(), metadata=agent)
    assert list(listed.approvals) == []
    session_id = await session_of(svc, agent)
    await svc.CancelSession(pb.CancelSessionRequest(session_id=session_id), metadata=agent)
    ended = await expect_error(request(svc, agent, session_id))
    assert ended.reason == "SESSION_TERMINAL"


async def test_watch_approval_waits_for_the_decision(server, idp):
    svc = stub(server)
    agent, alice, _, _ = people(idp)
    approval = await request(svc, agent)
    seen: list[pb.Approval] = []
    first = asyncio.Event()

    async def watch():
        call = svc.WatchApproval(
            pb.WatchApprovalRequest(approval_id=approval.approval_id), metadata=agent
        )
        async for message in call:
            seen.append(message.approval)
            first.set()

    watcher = asyncio.ensure_future(watch())
    await asyncio.wait_for(first.wait(), 10)
    started = time.monotonic()
    await svc.ApproveApproval(
        pb.ApproveApprovalRequest(approval_id=approval.approval_id), metadata=alice
    )
    await asyncio.wait_for(watcher, 10)  # the stream ends once decided
    assert time.monotonic() - started < 4  # pushed, not found by the 5 s poll
    assert [a.state for a in seen] == [A.APPROVAL_STATE_PENDING, A.APPROVAL_STATE_APPROVED]


async def test_token_dies_with_its_session(server, idp):
    svc = stub(server)
    agent, alice, _, _ = people(idp)
    session_id = await session_of(svc, agent)
    approval = await request(svc, agent, session_id)
    token = (
        await svc.ApproveApproval(
            pb.ApproveApprovalRequest(approval_id=approval.approval_id), metadata=alice
        )
    ).approval_token
    await svc.CancelSession(pb.CancelSessionRequest(session_id=session_id), metadata=agent)
    status = await expect_error(redeem(svc, agent, token, session_id=session_id))
    assert (status.code, status.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SESSION_TERMINAL")
    read = await svc.GetApproval(
        pb.GetApprovalRequest(approval_id=approval.approval_id), metadata=agent
    )
    assert not read.approval.HasField("redeem_time")
