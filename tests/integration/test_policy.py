"""PolicyService and the policy-backed authorizer through the real server.

Bundle lifecycle (bad bundles rejected while the old one serves, immutable versions,
rollback), Check (RBAC, session labels, approvals fail closed, delegation, checking others),
quotas (50 concurrent Checks on both cache backends, retries charged once, usage and reset),
Filter paging, Explain, tenant isolation, cross-process invalidation, and the suite's own
methods denied and allowed through the interceptor by a tenant bundle.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from trustplane.audit.v1 import audit_pb2
from trustplane.auth.v1 import auth_pb2
from trustplane.crypto.v1 import crypto_pb2
from trustplane.policy.v1 import policy_pb2 as pb
from trustplane.policy.v1 import policy_pb2_grpc
from trustplane.session.v1 import session_pb2, session_pb2_grpc

from interceptors.idempotency import scope_key
from server.actor import ActorContext, AuthMethod, PrincipalType
from server.methods import spec_from_descriptor
from tests.support.status import expect_error
from tests.support.tokens import OTHER_TENANT, TENANT, bearer
from tests.support.waiting import eventually

ALLOW, DENY, APPROVAL = pb.EFFECT_ALLOW, pb.EFFECT_DENY, pb.EFFECT_REQUIRE_APPROVAL

TOOLS = """
version: tools-1
resource_policies:
  - resource: tool
    rules:
      - name: members-invoke
        actions: [invoke]
        roles: [member, admin, agent]
        effect: ALLOW
      - name: payments-need-approval
        actions: [invoke]
        roles: ["*"]
        effect: REQUIRE_APPROVAL
        condition: resource.id == 'make_payment'
        approver_roles: [finance]
        approval_ttl_seconds: 900
      - name: no-exfiltration
        actions: [invoke]
        roles: ["*"]
        effect: DENY
        condition: >-
          resource.id in ['send_email', 'http_post'] &&
          'untrusted_input' in session.labels && 'private_data' in session.labels
quotas:
  - name: shell-per-session
    resource: tool
    actions: [invoke]
    condition: resource.id == 'shell'
    limit: 10
    window_seconds: 3600
    per: session
tests:
  - principal: {id: a, roles: [member]}
    resource: {kind: tool, id: search}
    action: invoke
    expect: {effect: ALLOW}
"""

DENY_KEY_CREATION = """
version: no-keys
resource_policies:
  - resource: trustplane.method
    rules:
      - name: no-key-creation
        actions: [crypto.keys.create]
        roles: ["*"]
        effect: DENY
      - name: everything-else
        actions: ["*"]
        roles: ["*"]
        effect: ALLOW
"""


def stub(running: Any) -> Any:
    return policy_pb2_grpc.PolicyServiceStub(running.channel)  # typed as the sync stub


def struct(**values: Any) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


@pytest.fixture
def admin(idp):
    return bearer(idp.token(roles=["admin"]))


@pytest.fixture
def member(idp):
    return bearer(idp.token(roles=["member"], sub="mia"))


AGENT = "agent-x"


def agent_token(idp, agent=AGENT, **claims):
    """An agent's own credential (a member of the tenant)."""
    return bearer(idp.token(sub=agent, ptype="agent", **claims))


@pytest.fixture
def agent(idp):
    return agent_token(idp)


async def new_session(running, credentials, labels=()) -> str:
    """A stored agent session created by `credentials` (an agent: its own session)."""
    sessions = session_pb2_grpc.SessionServiceStub(running.channel)
    request = session_pb2.CreateSessionRequest(request_id=str(uuid.uuid4()), labels=list(labels))
    return str((await sessions.CreateSession(request, metadata=credentials)).session.session_id)


async def add_labels(running, credentials, session_id, *labels):
    sessions = session_pb2_grpc.SessionServiceStub(running.channel)
    request = session_pb2.AddSessionLabelsRequest(session_id=session_id, labels=list(labels))
    await sessions.AddSessionLabels(request, metadata=credentials)


async def put(running, metadata, source, *, activate=True, **kw):
    request = pb.PutBundleRequest(
        source=source, activate=activate, request_id=str(uuid.uuid4()), **kw
    )
    return (await stub(running).PutBundle(request, metadata=metadata)).bundle


async def check(running, metadata, resources, actions=("invoke",), **kw):
    request = pb.CheckRequest(
        resources=[pb.Resource(kind=kind, id=rid) for kind, rid in resources],
        actions=list(actions),
        **kw,
    )
    return list((await stub(running).Check(request, metadata=metadata)).decisions)


async def one(running, metadata, kind="tool", rid="search", action="invoke", **kw):
    return (await check(running, metadata, [(kind, rid)], [action], **kw))[0]


# --- lifecycle ------------------------------------------------------------------------------


async def test_put_activate_and_check_name_the_version(server, admin, member):
    bundle = await put(server, admin, TOOLS)
    assert bundle.active and bundle.label == "tools-1" and len(bundle.version_id) == 64
    assert list(bundle.resource_kinds) == ["tool"] and list(bundle.quotas) == ["shell-per-session"]
    decisions = await check(server, member, [("tool", "search"), ("data", "d1")], ["invoke"])
    assert [(d.effect, d.reason) for d in decisions] == [
        (ALLOW, pb.DECISION_REASON_ALLOWED),
        (DENY, pb.DECISION_REASON_NO_MATCHING_RULE),
    ]
    assert decisions[0].rule == "members-invoke" and decisions[0].principal_id == "mia"
    assert {d.version_id for d in decisions} == {bundle.version_id}
    assert len({d.decision_id for d in decisions}) == 2


async def test_without_a_bundle_everything_but_suite_methods_is_denied(server, member):
    decision = await one(server, member)
    assert (decision.effect, decision.reason) == (DENY, pb.DECISION_REASON_NO_MATCHING_RULE)
    assert decision.version_id == ""
    method = await one(server, member, kind="trustplane.method", rid="", action="crypto.keys.use")
    assert method.effect == ALLOW and method.version_id  # the platform bundle decided


async def test_a_bad_bundle_is_rejected_while_the_old_one_serves(server, admin, member):
    good = await put(server, admin, TOOLS)
    broken = TOOLS.replace("resource.id == 'shell'", "resource.id ==")
    status = await expect_error(put(server, admin, broken))
    assert (status.code, status.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "POLICY_BUNDLE_INVALID",
    )
    assert [f for f, _ in status.field_violations] == ["quotas[0].condition"]
    failing_test = TOOLS.replace("expect: {effect: ALLOW}", "expect: {effect: DENY}")
    status = await expect_error(put(server, admin, failing_test))
    assert status.field_violations[0][0] == "tests[0]"
    status = await expect_error(put(server, admin, "resource_policies: [", activate=False))
    assert status.field_violations[0][0] == "document"
    assert (await one(server, member)).version_id == good.version_id
    listed = await stub(server).ListBundles(pb.ListBundlesRequest(), metadata=admin)
    assert [b.version_id for b in listed.bundles] == [good.version_id]


async def test_versions_are_content_hashed_and_immutable(server, admin):
    first = await put(server, admin, TOOLS, activate=False)
    again = await put(server, admin, TOOLS, activate=False)
    assert again.version_id == first.version_id and not again.active
    as_json = json.dumps(
        {
            "version": "tools-1",
            "resource_policies": [
                {
                    "resource": "tool",
                    "rules": [
                        {
                            "name": "x",
                            "actions": ["invoke"],
                            "roles": ["member"],
                            "effect": "ALLOW",
                        }
                    ],
                }
            ],
        }
    )
    other = await put(server, admin, as_json, activate=False, format=pb.BUNDLE_FORMAT_JSON)
    assert other.version_id != first.version_id and other.format == pb.BUNDLE_FORMAT_JSON
    got = await stub(server).GetBundle(
        pb.GetBundleRequest(version_id=first.version_id), metadata=admin
    )
    assert got.bundle.source == TOOLS and got.bundle.format == pb.BUNDLE_FORMAT_YAML


async def test_list_pages_newest_first(server, admin):
    ids = []
    for n in range(3):
        ids.append((await put(server, admin, TOOLS.replace("tools-1", f"v{n}"))).version_id)
    page = await stub(server).ListBundles(pb.ListBundlesRequest(page_size=2), metadata=admin)
    assert [b.version_id for b in page.bundles] == ids[::-1][:2]
    assert page.bundles[0].active and not page.bundles[1].active and not page.bundles[0].source
    rest = await stub(server).ListBundles(
        pb.ListBundlesRequest(page_size=2, page_token=page.next_page_token), metadata=admin
    )
    assert [b.version_id for b in rest.bundles] == [ids[0]] and not rest.next_page_token
    status = await expect_error(
        stub(server).ListBundles(
            pb.ListBundlesRequest(page_token=page.next_page_token[:-2] + "AA"), metadata=admin
        )
    )
    assert status.reason == "PAGE_TOKEN_INVALID"


async def test_rollback_walks_back_through_activations(server, admin, member):
    first = await put(server, admin, TOOLS)
    second = await put(server, admin, TOOLS.replace("tools-1", "tools-2"))
    assert (await one(server, member)).version_id == second.version_id
    rolled = await stub(server).RollbackBundle(
        pb.RollbackBundleRequest(request_id=str(uuid.uuid4())), metadata=admin
    )
    assert rolled.bundle.version_id == first.version_id and rolled.bundle.active
    assert (await one(server, member)).version_id == first.version_id
    status = await expect_error(
        stub(server).RollbackBundle(
            pb.RollbackBundleRequest(request_id=str(uuid.uuid4())), metadata=admin
        )
    )
    assert (status.code, status.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "POLICY_NO_PREVIOUS_VERSION",
    )
    assert (await one(server, member)).version_id == first.version_id


async def test_activate_unknown_or_malformed_version(server, admin):
    status = await expect_error(
        stub(server).ActivateBundle(pb.ActivateBundleRequest(version_id="0" * 64), metadata=admin)
    )
    assert (status.code, status.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    status = await expect_error(
        stub(server).ActivateBundle(pb.ActivateBundleRequest(version_id="x"), metadata=admin)
    )
    assert status.field_violations[0][0] == "version_id"


async def test_members_cannot_manage_bundles(server, member):
    status = await expect_error(put(server, member, TOOLS))
    assert (status.code, status.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")


async def test_tenant_isolation(server, idp, admin, member):
    bundle = await put(server, admin, TOOLS)
    other_admin = bearer(idp.token(roles=["admin"], tid=OTHER_TENANT))
    other_member = bearer(idp.token(roles=["member"], tid=OTHER_TENANT))
    status = await expect_error(
        stub(server).GetBundle(
            pb.GetBundleRequest(version_id=bundle.version_id), metadata=other_admin
        )
    )
    assert status.code is grpc.StatusCode.NOT_FOUND
    status = await expect_error(
        stub(server).ActivateBundle(
            pb.ActivateBundleRequest(version_id=bundle.version_id), metadata=other_admin
        )
    )
    assert status.code is grpc.StatusCode.NOT_FOUND
    assert (await one(server, other_member)).reason == pb.DECISION_REASON_NO_MATCHING_RULE
    assert (await one(server, member)).effect == ALLOW


# --- Check ----------------------------------------------------------------------------------


async def test_session_labels_deny_exfiltration(server, admin, agent):
    await put(server, admin, TOOLS)
    tainted = await new_session(server, agent, ["untrusted_input", "private_data"])
    decisions = await check(
        server,
        agent,
        [("tool", "send_email"), ("tool", "search")],
        session=pb.SessionContext(id=tainted),
    )
    assert [(d.effect, d.rule) for d in decisions] == [
        (DENY, "no-exfiltration"),
        (ALLOW, "members-invoke"),
    ]
    clean = pb.SessionContext(id=await new_session(server, agent, ["private_data"]))
    assert (await one(server, agent, rid="send_email", session=clean)).effect == ALLOW
    # Outside any stored session the call's own labels are all there is.
    outside = pb.SessionContext(labels=["untrusted_input", "private_data"])
    assert (await one(server, agent, rid="send_email", session=outside)).effect == DENY


async def test_omitting_labels_cannot_bypass_the_exfiltration_rule(server, idp, admin, agent):
    """The labels are the stored session's: a runtime that names its session but sends no
    labels (or whose token is bound to the session and names none) is still denied."""
    await put(server, admin, TOOLS)
    tainted = await new_session(server, agent, ["private_data"])
    named = pb.SessionContext(id=tainted)
    assert (await one(server, agent, rid="send_email", session=named)).effect == ALLOW
    await add_labels(server, agent, tainted, "untrusted_input")  # e.g. it read a web page
    decision = await one(server, agent, rid="send_email", session=named)  # no labels sent
    assert (decision.effect, decision.rule) == (DENY, "no-exfiltration")
    bound = bearer(
        idp.token(
            sub="user-1", roles=["member"], act={"sub": AGENT, "ptype": "agent"}, asid=tainted
        )
    )
    as_user = pb.Principal(id="user-1", roles=["member"])  # the user's side of the chain
    decision = (await check(server, admin, [("tool", "send_email")], principal=as_user))[0]
    assert decision.effect == ALLOW  # outside the session, the user may email
    decision = await one(server, bound, rid="send_email")  # no session named: the bound one
    assert (decision.effect, decision.rule) == (DENY, "no-exfiltration")
    # Sent labels only add to the stored ones; sent attributes are refused.
    added = pb.SessionContext(id=await new_session(server, agent), labels=["untrusted_input"])
    assert (await one(server, agent, rid="send_email", session=added)).effect == ALLOW
    added.labels.append("private_data")
    assert (await one(server, agent, rid="send_email", session=added)).effect == DENY
    forged = pb.SessionContext(id=tainted, attr=struct(state="ACTIVE"))
    status = await expect_error(one(server, agent, rid="send_email", session=forged))
    assert [f for f, _ in status.field_violations] == ["session.attr"]


async def test_a_label_added_in_another_process_applies_at_once(start_server, make_config, idp):
    """Policy reads of a session are cached per process (here for a minute); a change in any
    process drops them everywhere (pub/sub), so the next Check sees the new label."""
    config = make_config(TRUSTPLANE_SESSION_READ_TTL="60")
    admin, agent = bearer(idp.token(roles=["admin"])), agent_token(idp)
    async with start_server(config) as first, start_server(config) as second:
        await put(first, admin, TOOLS)
        session = pb.SessionContext(id=await new_session(first, agent, ["private_data"]))
        assert (await one(first, agent, rid="send_email", session=session)).effect == ALLOW
        await add_labels(second, agent, session.id, "untrusted_input")

        async def denied() -> bool:
            return bool((await one(first, agent, rid="send_email", session=session)).effect == DENY)

        await eventually(denied, what="the first process drops its stale read of the session")


async def test_a_session_the_caller_takes_no_part_in_is_not_found(server, idp, admin, agent):
    await put(server, admin, TOOLS)
    theirs = await new_session(server, agent_token(idp, "agent-y"))
    for session_id in (theirs, str(uuid.uuid4()), "s-made-up"):
        status = await expect_error(
            one(server, agent, rid="search", session=pb.SessionContext(id=session_id))
        )
        assert (status.code, status.reason) == (
            grpc.StatusCode.NOT_FOUND,
            "POLICY_SESSION_NOT_FOUND",
        )
    other_tenant = agent_token(idp, tid=OTHER_TENANT)
    status = await expect_error(
        one(server, other_tenant, rid="search", session=pb.SessionContext(id=theirs))
    )
    assert status.reason == "POLICY_SESSION_NOT_FOUND"
    # An administrator deciding for someone else may name any session of the tenant.
    bot = pb.Principal(id="bot", roles=["agent"], type="agent")
    decision = (
        await check(
            server, admin, [("tool", "search")], principal=bot, session=pb.SessionContext(id=theirs)
        )
    )[0]
    assert decision.effect == ALLOW


async def test_nothing_is_allowed_in_an_ended_session(server, admin, agent):
    await put(server, admin, TOOLS)
    session_id = await new_session(server, agent)
    sessions = session_pb2_grpc.SessionServiceStub(server.channel)
    await sessions.CancelSession(
        session_pb2.CancelSessionRequest(session_id=session_id), metadata=agent
    )
    decision = await one(server, agent, rid="search", session=pb.SessionContext(id=session_id))
    assert (decision.effect, decision.reason) == (DENY, pb.DECISION_REASON_SESSION_ENDED)


async def test_require_approval_says_what_to_ask(server, admin, member):
    await put(server, admin, TOOLS)
    asked = await one(server, member, rid="make_payment")
    assert (asked.effect, asked.reason) == (APPROVAL, pb.DECISION_REASON_APPROVAL_REQUIRED)
    assert list(asked.approval.approver_roles) == ["finance"]
    assert asked.approval.ttl.seconds == 900 and len(asked.approval.call_digest) == 32
    unknown = await one(server, member, rid="make_payment", approval_token="tpap_unknown")
    assert (unknown.effect, unknown.reason) == (DENY, pb.DECISION_REASON_APPROVAL_INVALID)
    status = await expect_error(
        check(server, member, [("tool", "a"), ("tool", "b")], approval_token="tok")
    )
    assert status.field_violations[0][0] == "approval_token"


async def approval_token(running, requester, approver, digest: bytes) -> str:
    """The Session approval flow: the requester asks for `digest`, a finance admin approves."""
    sessions = session_pb2_grpc.SessionServiceStub(running.channel)
    requested = await sessions.RequestApproval(
        session_pb2.RequestApprovalRequest(
            request_id=str(uuid.uuid4()),
            action_digest=digest,
            action="tool.invoke make_payment",
            reason="pay the invoice",
            approver_roles=["finance"],
        ),
        metadata=requester,
    )
    approved = await sessions.ApproveApproval(
        session_pb2.ApproveApprovalRequest(approval_id=requested.approval.approval_id, note="ok"),
        metadata=approver,
    )
    return str(approved.approval_token)


async def test_an_approval_token_allows_the_same_call_exactly_once(server, idp, admin, member):
    await put(server, admin, TOOLS)
    finance = bearer(idp.token(roles=["admin", "finance"], sub="fin-1"))

    def payment(amount: int, token: str = "") -> pb.CheckRequest:
        return pb.CheckRequest(
            resources=[pb.Resource(kind="tool", id="make_payment", attr=struct(amount=amount))],
            actions=["invoke"],
            approval_token=token,
        )

    async def decide(request, metadata=member):
        return (await stub(server).Check(request, metadata=metadata)).decisions[0]

    digest = (await decide(payment(10))).approval.call_digest
    token = await approval_token(server, member, finance, digest)
    approved = await decide(payment(10, token))
    assert (approved.effect, approved.reason) == (ALLOW, pb.DECISION_REASON_APPROVED)
    again = await decide(payment(10, token))  # single use
    assert (again.effect, again.reason) == (DENY, pb.DECISION_REASON_APPROVAL_INVALID)

    other = await approval_token(server, member, finance, digest)
    bigger = await decide(payment(11, other))  # bound to the call digest
    assert (bigger.effect, bigger.reason) == (DENY, pb.DECISION_REASON_APPROVAL_INVALID)
    someone_else = bearer(idp.token(roles=["member"], sub="mallory"))
    stolen = await decide(payment(10, other), someone_else)  # bound to the requester
    assert (stolen.effect, stolen.reason) == (DENY, pb.DECISION_REASON_APPROVAL_INVALID)
    # A failed redemption does not spend the token: the requester can still use it once.
    assert (await decide(payment(10, other))).effect == ALLOW


PAYMENTS = TOOLS.replace(
    "quotas:\n",
    """quotas:
  - name: one-payment-a-day
    resource: tool
    actions: [invoke]
    condition: resource.id == 'make_payment'
    limit: 1
    window_seconds: 86400
    per: principal
""",
)


async def test_a_quota_denial_does_not_spend_the_approval_token(server, idp, admin, member):
    """Quotas are charged before the token is redeemed: a decision the quota stops leaves the
    token unspent, and a refused token gives the charge back."""
    await put(server, admin, PAYMENTS)
    finance = bearer(idp.token(roles=["admin", "finance"], sub="fin-1"))

    async def pay(token=""):
        return await one(server, member, rid="make_payment", approval_token=token)

    async def used():
        usage = await stub(server).GetQuotaUsage(
            pb.GetQuotaUsageRequest(name="one-payment-a-day", subject="mia"), metadata=admin
        )
        return usage.usage.used

    digest = (await pay()).approval.call_digest
    first, second = [await approval_token(server, member, finance, digest) for _ in range(2)]
    assert (await pay(first)).reason == pb.DECISION_REASON_APPROVED
    stopped = await pay(second)
    assert (stopped.effect, stopped.reason) == (DENY, pb.DECISION_REASON_QUOTA_EXCEEDED)
    await stub(server).ResetQuotaUsage(
        pb.ResetQuotaUsageRequest(name="one-payment-a-day", subject="mia"), metadata=admin
    )
    refused = await pay("tpap_not-a-token")
    assert (refused.reason, list(refused.quotas)) == (pb.DECISION_REASON_APPROVAL_INVALID, [])
    assert await used() == 0  # the refused token's charge was given back
    allowed = await pay(second)  # still unspent
    assert (allowed.effect, allowed.reason) == (ALLOW, pb.DECISION_REASON_APPROVED)
    assert await used() == 1


async def test_the_call_digest_binds_the_resource_attributes(server, admin, member):
    await put(server, admin, TOOLS)

    async def digest(amount):
        request = pb.CheckRequest(
            resources=[pb.Resource(kind="tool", id="make_payment", attr=struct(amount=amount))],
            actions=["invoke"],
        )
        return (
            (await stub(server).Check(request, metadata=member)).decisions[0].approval.call_digest
        )

    assert await digest(10) == await digest(10)
    assert await digest(10) != await digest(11)


INTERSECTION = """
version: intersection
resource_policies:
  - resource: tool
    rules:
      - name: analysts-run-reports
        actions: [invoke]
        roles: [analyst]
        effect: ALLOW
"""


async def registered_tenant(running):
    """A tenant of this server with its owner logged in (agents need a registered owner)."""
    tenant, _, password = await running.app.auth.bootstrap("acme", "owner@acme.test")
    login = await running.auth.Login(
        auth_pb2.LoginRequest(tenant="acme", email="owner@acme.test", password=password)
    )
    return tenant, bearer(login.tokens.access_token)


async def registered_agent(running, owner, roles, purpose="reports") -> str:
    request = auth_pb2.CreateAgentRequest(
        request_id=str(uuid.uuid4()), display_name="helper", purpose=purpose, roles=roles
    )
    return str((await running.auth.CreateAgent(request, metadata=owner)).agent.agent_id)


def acting_for(idp, tenant, roles, agent_id):
    """A user's token delegated to `agent_id` (RFC 8693 `act`)."""
    act = {"sub": agent_id, "ptype": "agent"}
    return bearer(idp.token(sub="u1", roles=roles, tid=tenant, act=act))


async def test_delegation_is_the_intersection(server, idp):
    """Each principal of the chain is decided with its own roles: the user's from its token,
    the agent's as the Auth service holds them."""
    tenant, owner = await registered_tenant(server)
    await put(server, owner, INTERSECTION)
    analyst = await registered_agent(server, owner, ["member", "analyst"])
    plain = await registered_agent(server, owner, ["member"])
    both = await one(server, acting_for(idp, tenant, ["member", "analyst"], analyst))
    assert (both.effect, both.rule, both.principal_id) == (ALLOW, "analysts-run-reports", "u1")
    agent_denied = await one(server, acting_for(idp, tenant, ["member", "analyst"], plain))
    assert (agent_denied.effect, agent_denied.principal_id) == (DENY, plain)
    user_denied = await one(server, acting_for(idp, tenant, ["member"], analyst))
    assert (user_denied.effect, user_denied.principal_id) == (DENY, "u1")
    # An agent this server does not know (an external issuer's) has no roles here.
    unknown = await one(server, acting_for(idp, tenant, ["member", "analyst"], "agent-7"))
    assert (unknown.effect, unknown.principal_id) == (DENY, "agent-7")


BY_PURPOSE = """
version: by-purpose
derived_roles:
  report-agent:
    parent_roles: ["*"]
    condition: principal.attr.purpose == 'reports'
resource_policies:
  - resource: tool
    rules:
      - name: report-agents-run-reports
        actions: [invoke]
        derived_roles: [report-agent]
        effect: ALLOW
  - resource: trustplane.method
    rules:
      - name: untrusted-agents-make-no-keys
        actions: [crypto.keys.create]
        roles: ["*"]
        effect: DENY
        condition: principal.type == 'agent' && principal.attr.purpose == 'untrusted'
"""


async def test_the_callers_own_attributes_are_loaded(server, idp):
    """A self-check (and the authorize layer) sees the caller's stored attributes, so rules on
    `principal.attr` decide instead of failing closed on a missing attribute."""
    tenant, owner = await registered_tenant(server)
    await put(server, owner, BY_PURPOSE)
    reporter = await registered_agent(server, owner, ["member"], purpose="reports")
    other = await registered_agent(server, owner, ["member"], purpose="untrusted")

    def own(agent_id):
        return bearer(idp.token(sub=agent_id, ptype="agent", tid=tenant))

    decision = await one(server, own(reporter), rid="report")
    assert (decision.effect, decision.rule) == (ALLOW, "report-agents-run-reports")
    decision = await one(server, own(other), rid="report")
    assert (decision.effect, decision.reason) == (DENY, pb.DECISION_REASON_NO_MATCHING_RULE)
    await create_key(server, own(reporter), "reports-key")  # the condition is false, not an error
    status = await expect_error(create_key(server, own(other), "untrusted-key"))
    assert "untrusted-agents-make-no-keys" in status.message


async def test_principal_lookups_are_shared_and_cached(server, idp, monkeypatch):
    """The roles of a call's principals are one store read for the calls that miss together,
    then reused (here for the default 1 s)."""
    tenant, owner = await registered_tenant(server)
    agent_id = await registered_agent(server, owner, ["member"])
    directory = server.app._principals
    reads = []
    real = directory._store.principals

    async def counted(tenant_id, ids):
        reads.append(tuple(ids))
        return await real(tenant_id, ids)

    monkeypatch.setattr(directory._store, "principals", counted)
    found = await asyncio.gather(
        *(directory.principals(tenant, [agent_id, "agent-7"]) for _ in range(16))
    )
    assert reads == [(agent_id, "agent-7")]
    assert {tuple(f) for f in found} == {(agent_id,)}  # the unknown id is absent
    assert found[0][agent_id].roles == frozenset({"member"})
    await directory.principals(tenant, ["agent-7", agent_id])
    assert len(reads) == 1


async def test_suite_methods_are_the_intersection_and_obey_the_kill_switch(start_server, idp):
    async with start_server(TRUSTPLANE_POLICY_PRINCIPAL_CACHE_TTL="0") as server:
        tenant, owner = await registered_tenant(server)
        reader = await registered_agent(server, owner, ["viewer"])
        writer = await registered_agent(server, owner, ["member"])
        via_reader = acting_for(idp, tenant, ["member"], reader)
        via_writer = acting_for(idp, tenant, ["member"], writer)
        await create_key(server, via_writer, "by-the-writer")
        status = await expect_error(create_key(server, via_reader, "by-the-reader"))
        assert (status.code, status.metadata) == (
            grpc.StatusCode.PERMISSION_DENIED,
            {"permission": "crypto.keys.create"},
        )
        assert reader in status.message
        await server.crypto.GetKey(
            crypto_pb2.GetKeyRequest(name="by-the-writer"), metadata=via_reader
        )
        status = await expect_error(one(server, via_reader))  # not even Check (a member's)
        assert reader in status.message
        # Check on trustplane.method agrees (asked by an administrator, for that chain).
        user = pb.Principal(id="u1", roles=["member"], type="user")
        chain = [pb.Principal(id=reader, roles=["viewer"], type="agent")]
        admin = bearer(idp.token(sub="ada", roles=["admin"], tid=tenant))
        resource = [("trustplane.method", "")]
        asked = await check(
            server, admin, resource, ["crypto.keys.create"], principal=user, delegates=chain
        )
        assert (asked[0].effect, asked[0].principal_id) == (DENY, reader)
        await server.auth.SetAgentDisabled(
            auth_pb2.SetAgentDisabledRequest(agent_id=writer, disabled=True), metadata=owner
        )
        get = crypto_pb2.GetKeyRequest(name="by-the-writer")
        # Tokens issued up to the kill switch are on the deny-list (the agent is in `act`)...
        status = await expect_error(server.crypto.GetKey(get, metadata=via_writer))
        assert (status.code, status.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
        # ...and one issued later by an outside issuer is refused by authorization, which reads
        # the delegate's stored disabled flag.
        later = int(time.time()) + 5
        act = {"sub": writer, "ptype": "agent"}
        fresh = bearer(idp.token(sub="u1", roles=["member"], tid=tenant, act=act, iat=later))
        status = await expect_error(server.crypto.GetKey(get, metadata=fresh))
        assert status.code is grpc.StatusCode.PERMISSION_DENIED and "disabled" in status.message


async def test_checking_others_needs_a_permission(server, admin, member):
    await put(server, admin, TOOLS)
    other = pb.Principal(id="bot", roles=["agent"], type="agent")
    status = await expect_error(check(server, member, [("tool", "x")], principal=other))
    assert (status.code, status.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "POLICY_CHECK_OTHERS_DENIED",
    )
    decision = (await check(server, admin, [("tool", "x")], principal=other))[0]
    assert (decision.effect, decision.principal_id) == (ALLOW, "bot")
    chain = [pb.Principal(id="intern", roles=["guest"])]
    decision = (await check(server, admin, [("tool", "x")], principal=other, delegates=chain))[0]
    assert (decision.effect, decision.principal_id) == (DENY, "intern")


async def test_check_input_limits(start_server, idp):
    async with start_server(TRUSTPLANE_POLICY_MAX_CHECKS="4") as running:
        member = bearer(idp.token(roles=["member"]))
        status = await expect_error(
            check(running, member, [("tool", str(i)) for i in range(3)], ["a", "b"])
        )
        assert (status.code, status.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "POLICY_REQUEST_TOO_LARGE",
        )
        status = await expect_error(check(running, member, [], ["a"]))
        assert [f for f, _ in status.field_violations] == ["resources"]
        status = await expect_error(check(running, member, [("", "x")], [""]))
        assert [f for f, _ in status.field_violations] == ["resources[0].kind", "actions[0]"]


# --- quotas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_fifty_concurrent_checks_never_exceed_the_quota(start_server, idp, backend):
    overrides = {"REDIS_URL": ""} if backend == "memory" else {}
    async with start_server(**overrides) as running:
        admin = bearer(idp.token(roles=["admin"]))
        await put(running, admin, TOOLS)
        busy = await new_session(running, agent_token(idp))
        session = pb.SessionContext(id=busy)
        tokens = [agent_token(idp, jti=uuid.uuid4().hex) for _ in range(50)]
        results = await asyncio.gather(
            *(one(running, t, rid="shell", session=session) for t in tokens)
        )
        allowed = [d for d in results if d.effect == ALLOW]
        assert len(allowed) == 10
        assert sorted(d.quotas[0].remaining for d in allowed) == list(range(10))
        refused = [d for d in results if d.effect == DENY]
        assert {(d.reason, d.rule) for d in refused} == {
            (pb.DECISION_REASON_QUOTA_EXCEEDED, "shell-per-session")
        }
        assert all(d.quotas[0].exceeded and d.quotas[0].reset_time.seconds for d in refused)
        # Another session has its own budget.
        other = pb.SessionContext(id=await new_session(running, tokens[0]))
        assert (await one(running, tokens[0], rid="shell", session=other)).effect == ALLOW
        usage = await stub(running).GetQuotaUsage(
            pb.GetQuotaUsageRequest(name="shell-per-session", subject=busy), metadata=admin
        )
        assert (usage.usage.used, usage.usage.remaining, usage.usage.limit) == (10, 0, 10)


async def test_a_retried_check_is_charged_once(server, admin, agent):
    await put(server, admin, TOOLS)
    session_id = await new_session(server, agent)
    session = pb.SessionContext(id=session_id)
    request_id = str(uuid.uuid4())
    first = await one(server, agent, rid="shell", session=session, request_id=request_id)
    retry = await one(server, agent, rid="shell", session=session, request_id=request_id)
    assert first.effect == retry.effect == ALLOW
    assert first.quotas[0].remaining == retry.quotas[0].remaining == 9
    other = await one(server, agent, rid="shell", session=session, request_id=str(uuid.uuid4()))
    assert other.quotas[0].remaining == 8
    usage = await stub(server).GetQuotaUsage(
        pb.GetQuotaUsageRequest(name="shell-per-session", subject=session_id), metadata=admin
    )
    assert usage.usage.used == 2


async def test_a_per_session_quota_cannot_be_escaped_by_naming_another_session(
    server, idp, admin, agent
):
    await put(server, admin, TOOLS)
    mine = await new_session(server, agent)
    for _ in range(10):
        assert (
            await one(server, agent, rid="shell", session=pb.SessionContext(id=mine))
        ).effect == ALLOW
    spent = await one(server, agent, rid="shell", session=pb.SessionContext(id=mine))
    assert (spent.effect, spent.reason) == (DENY, pb.DECISION_REASON_QUOTA_EXCEEDED)
    theirs = await new_session(server, agent_token(idp, "agent-y"))
    for elsewhere in (theirs, str(uuid.uuid4()), "s-fresh-counter"):
        status = await expect_error(
            one(server, agent, rid="shell", session=pb.SessionContext(id=elsewhere))
        )
        assert status.reason == "POLICY_SESSION_NOT_FOUND"
    # A token bound to the session cannot name another one, and naming none is its own.
    bound = agent_token(idp, asid=mine)
    status = await expect_error(
        one(server, bound, rid="shell", session=pb.SessionContext(id=theirs))
    )
    assert (status.code, status.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "POLICY_SESSION_MISMATCH",
    )
    assert (await one(server, bound, rid="shell")).reason == pb.DECISION_REASON_QUOTA_EXCEEDED
    usage = await stub(server).GetQuotaUsage(
        pb.GetQuotaUsageRequest(name="shell-per-session", subject=theirs), metadata=admin
    )
    assert usage.usage.used == 0  # nothing was charged to the session it named


async def test_a_retry_is_charged_once_even_without_its_replay_copy(server, idp, admin):
    """The idempotency layer's replay copy is lost (a crash between the charge and the cache
    write, or the record expired): the per-decision receipt still prevents a second charge."""
    await put(server, admin, TOOLS)
    agent = agent_token(idp)
    request = pb.CheckRequest(
        resources=[pb.Resource(kind="tool", id="shell")],
        actions=["invoke"],
        session=pb.SessionContext(id=await new_session(server, agent)),
        request_id=str(uuid.uuid4()),
    )
    first = (await stub(server).Check(request, metadata=agent)).decisions[0]
    actor = ActorContext(TENANT, AGENT, PrincipalType.AGENT, AuthMethod.JWT)
    spec = spec_from_descriptor(
        pb.DESCRIPTOR.services_by_name["PolicyService"].methods_by_name["Check"]
    )
    assert await server.app.cache.delete(scope_key(actor, spec, request.request_id))
    call = stub(server).Check(request, metadata=agent)
    again = (await call).decisions[0]
    assert dict(await call.initial_metadata()).get("idempotency-replayed") is None
    assert again.decision_id != first.decision_id  # decided again ...
    assert again.quotas[0].remaining == first.quotas[0].remaining == 9  # ... charged once


async def test_quota_usage_list_and_reset(server, admin, member, agent):
    await put(server, admin, TOOLS)
    session_id = await new_session(server, agent)
    session = pb.SessionContext(id=session_id)
    for _ in range(3):
        await one(server, agent, rid="shell", session=session)
    listed = await stub(server).ListQuotaUsage(
        pb.ListQuotaUsageRequest(subject=session_id), metadata=admin
    )
    assert [(u.name, u.used, u.scope) for u in listed.usages] == [
        ("shell-per-session", 3, pb.QUOTA_SCOPE_SESSION)
    ]
    status = await expect_error(
        stub(server).ResetQuotaUsage(
            pb.ResetQuotaUsageRequest(name="shell-per-session", subject=session_id),
            metadata=member,
        )
    )
    assert status.code is grpc.StatusCode.PERMISSION_DENIED
    reset = await stub(server).ResetQuotaUsage(
        pb.ResetQuotaUsageRequest(name="shell-per-session", subject=session_id), metadata=admin
    )
    assert (reset.usage.used, reset.usage.remaining) == (0, 10)
    status = await expect_error(
        stub(server).GetQuotaUsage(pb.GetQuotaUsageRequest(name="nope"), metadata=admin)
    )
    assert (status.code, status.reason) == (grpc.StatusCode.NOT_FOUND, "POLICY_QUOTA_NOT_FOUND")


# --- Filter and Explain ---------------------------------------------------------------------


async def test_filter_pages_through_every_candidate(server, admin, member):
    await put(server, admin, TOOLS)
    names = ["a", "send_email", "b", "make_payment", "c", "d"]
    tainted = pb.SessionContext(labels=["untrusted_input", "private_data"])
    request = pb.FilterRequest(
        action="invoke",
        candidates=[pb.Resource(kind="tool", id=n) for n in names],
        session=tainted,
        page_size=2,
    )
    seen, pages = [], 0
    while True:
        page = await stub(server).Filter(request, metadata=member)
        seen += [(r.index, r.id) for r in page.allowed]
        pages += 1
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert seen == [(0, "a"), (2, "b"), (4, "c"), (5, "d")]
    assert pages == 2
    changed = pb.FilterRequest(action="read", candidates=request.candidates, page_token="x")
    status = await expect_error(stub(server).Filter(changed, metadata=member))
    assert status.reason == "PAGE_TOKEN_INVALID"


async def test_filter_refuses_rather_than_truncates(start_server, idp):
    async with start_server(TRUSTPLANE_POLICY_MAX_FILTER_CANDIDATES="3") as running:
        request = pb.FilterRequest(
            action="invoke", candidates=[pb.Resource(kind="tool", id=str(i)) for i in range(4)]
        )
        member = bearer(idp.token(roles=["member"]))
        status = await expect_error(stub(running).Filter(request, metadata=member))
        assert status.reason == "POLICY_REQUEST_TOO_LARGE"


async def test_explain_is_for_administrators(server, admin, member):
    await put(server, admin, TOOLS)
    request = pb.ExplainRequest(
        resource=pb.Resource(kind="tool", id="make_payment"), action="invoke"
    )
    explained = await stub(server).Explain(request, metadata=admin)
    assert explained.decision.effect == APPROVAL
    rules = [(s.kind, s.name) for s in explained.trace if s.kind == "RULE"]
    assert rules == [
        ("RULE", "members-invoke"),
        ("RULE", "payments-need-approval"),
        ("RULE", "no-exfiltration"),
    ]
    status = await expect_error(stub(server).Explain(request, metadata=member))
    assert status.code is grpc.StatusCode.PERMISSION_DENIED


# --- enforcement of the suite ---------------------------------------------------------------


async def create_key(running, metadata, name="k"):
    request = crypto_pb2.CreateKeyRequest(
        request_id=str(uuid.uuid4()), name=name, purpose=crypto_pb2.KEY_PURPOSE_ENCRYPT_DECRYPT
    )
    return await running.crypto.CreateKey(request, metadata=metadata)


async def test_a_tenant_bundle_denies_a_suite_method_for_that_tenant_only(server, idp, admin):
    other_admin = bearer(idp.token(roles=["admin"], tid=OTHER_TENANT))
    await create_key(server, admin, "before")
    await put(server, admin, DENY_KEY_CREATION)
    status = await expect_error(create_key(server, admin, "after"))
    assert (status.code, status.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    assert "no-key-creation" in status.message
    assert status.metadata == {"permission": "crypto.keys.create"}
    await create_key(server, other_admin, "after")  # the other tenant is untouched
    # Everything else the platform grants still works (the tenant's ALLOW-all changes nothing).
    await server.crypto.GetKey(crypto_pb2.GetKeyRequest(name="before"), metadata=admin)
    # The tenant can always repair its bundle: with the rule gone, keys can be created again.
    await put(server, admin, TOOLS)
    await create_key(server, admin, "repaired")


async def test_a_tenant_allow_cannot_exceed_the_platform(server, idp, admin):
    await put(server, admin, DENY_KEY_CREATION.replace("[crypto.keys.create]", "[nothing.here]"))
    viewer = bearer(idp.token(roles=["viewer"]))
    status = await expect_error(create_key(server, viewer))
    assert status.code is grpc.StatusCode.PERMISSION_DENIED
    assert "no role" in status.message


async def test_activation_reaches_every_process(start_server, make_config, idp):
    config = make_config()
    admin = bearer(idp.token(roles=["admin"]))
    async with start_server(config) as first, start_server(config) as second:
        await create_key(second, admin, "warm")  # second caches "no tenant bundle"
        await put(first, admin, DENY_KEY_CREATION)

        async def refused() -> bool:
            try:
                await create_key(second, admin, f"k{uuid.uuid4().hex[:8]}")
            except grpc.aio.AioRpcError as error:
                assert error.code() is grpc.StatusCode.PERMISSION_DENIED
                return True
            return False

        await eventually(refused, what="the second process sees the activation")


async def test_a_tenant_rule_on_delegates_applies_to_the_whole_chain(server, idp, admin):
    await put(
        server,
        admin,
        """
version: agents-no-keys
resource_policies:
  - resource: trustplane.method
    rules:
      - name: agents-create-no-keys
        actions: [crypto.keys.create]
        roles: ["*"]
        effect: DENY
        condition: principal.type == 'agent'
""",
    )
    await create_key(server, admin, "by-the-user")
    delegated = bearer(idp.token(roles=["admin"], act={"sub": "agent-3", "ptype": "agent"}))
    status = await expect_error(create_key(server, delegated, "by-the-agent"))
    assert status.code is grpc.StatusCode.PERMISSION_DENIED
    assert "agents-create-no-keys" in status.message
    # A method the rule does not name is still allowed through the agent.
    await server.crypto.GetKey(crypto_pb2.GetKeyRequest(name="by-the-user"), metadata=delegated)
    # Check on trustplane.method answers as the authorize layer enforces.
    asked = await one(server, delegated, kind="trustplane.method", action="crypto.keys.create")
    assert (asked.effect, asked.rule, asked.principal_id) == (
        DENY,
        "agents-create-no-keys",
        "agent-3",
    )
    direct = await one(server, admin, kind="trustplane.method", action="crypto.keys.create")
    assert direct.effect == ALLOW


async def test_decisions_are_in_the_checks_audit_entry(server, idp, admin, member):
    await put(server, admin, TOOLS)
    decisions = await check(server, member, [("tool", "search"), ("tool", "make_payment")])
    await server.app.audit.flush()
    viewer = bearer(idp.token(roles=["viewer"]))
    listed = await server.audit.ListEntries(
        audit_pb2.ListEntriesRequest(method="/trustplane.policy.v1.PolicyService/Check"),
        metadata=viewer,
    )
    (entry,) = listed.entries
    recorded = [entry.attributes[f"decision.{n}"].split(" ") for n in range(2)]
    assert [r[:4] for r in recorded] == [
        [decisions[0].decision_id, "ALLOW", "ALLOWED", "members-invoke"],
        [
            decisions[1].decision_id,
            "REQUIRE_APPROVAL",
            "APPROVAL_REQUIRED",
            "payments-need-approval",
        ],
    ]
    assert recorded[1][5:] == ["tool/make_payment", "invoke"]


async def entry_of(server, idp, method, count=1):
    """The newest audit entry of one PolicyService method, once there are `count` (a refused
    call's status can reach the client before its entry is committed)."""
    for _ in range(100):
        await server.app.audit.flush()
        listed = await server.audit.ListEntries(
            audit_pb2.ListEntriesRequest(method=f"/trustplane.policy.v1.PolicyService/{method}"),
            metadata=bearer(idp.token(roles=["viewer"])),
        )
        if len(listed.entries) >= count:
            return listed.entries[-1]
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {count} {method} entries")


async def test_explain_filter_and_authorization_decisions_are_audited(server, idp, admin, member):
    bundle = await put(server, admin, TOOLS)
    explained = await stub(server).Explain(
        pb.ExplainRequest(resource=pb.Resource(kind="tool", id="search"), action="invoke"),
        metadata=admin,
    )
    recorded = (await entry_of(server, idp, "Explain")).attributes["decision.0"].split(" ")
    assert recorded == [
        explained.decision.decision_id,
        "ALLOW",
        "ALLOWED",
        "members-invoke",
        bundle.version_id[:16],
        "tool/search",
        "invoke",
    ]
    names = ["a", "send_email", "b"]
    request = pb.FilterRequest(
        action="invoke",
        candidates=[pb.Resource(kind="tool", id=n) for n in names],
        session=pb.SessionContext(labels=["untrusted_input", "private_data"]),
        page_size=1,
    )
    page = await stub(server).Filter(request, metadata=member)
    request.page_token = page.next_page_token
    second = await stub(server).Filter(request, metadata=member)
    assert page.decision_id and second.decision_id != page.decision_id
    attributes = (await entry_of(server, idp, "Filter")).attributes
    assert attributes["filter"].split(" ") == [
        second.decision_id,
        bundle.version_id[:16],
        "invoke",
        "from=1",
        "evaluated=2",
    ]
    assert attributes["filter.allowed"] == "2"  # send_email (1) was denied
    # The authorize layer records its decision on every call's permission, allowed or not.
    allowed = (await entry_of(server, idp, "Filter")).attributes["authorization"].split(" ")
    assert allowed[1:4] == ["ALLOW", "ALLOWED", "-"] and len(allowed[0]) == 32
    assert allowed[5:] == ["trustplane.method/policy.decisions.check", "policy.decisions.check"]
    await expect_error(put(server, member, TOOLS))
    refused = await entry_of(server, idp, "PutBundle", count=2)
    denied = refused.attributes["authorization"].split(" ")
    assert denied[1:4] == ["DENY", "NO_MATCHING_RULE", "-"]
    assert denied[6] == "policy.bundles.manage" and denied[0] != allowed[0]


async def test_a_locked_out_tenant_can_still_repair_its_bundle(server, idp, admin):
    lockout = """
version: lockout
resource_policies:
  - resource: trustplane.method
    rules:
      - name: nothing-at-all
        actions: ["*"]
        roles: ["*"]
        effect: DENY
"""
    await put(server, admin, lockout)
    status = await expect_error(create_key(server, admin))
    assert "nothing-at-all" in status.message
    status = await expect_error(one(server, admin))
    assert status.metadata == {"permission": "policy.decisions.check"}
    # policy.bundles.* is exempt from tenant restrictions: the bundle can be repaired.
    listed = await stub(server).ListBundles(pb.ListBundlesRequest(), metadata=admin)
    assert listed.bundles[0].label == "lockout"
    await put(server, admin, TOOLS)
    await create_key(server, admin)


async def test_check_on_a_suite_method_keeps_the_repair_exemption(server, admin):
    await put(
        server,
        admin,
        """
version: no-bundles-no-keys
resource_policies:
  - resource: trustplane.method
    rules:
      - name: no-bundles-no-keys
        actions: [policy.bundles.manage, crypto.keys.create]
        roles: ["*"]
        effect: DENY
""",
    )
    repair = await one(server, admin, kind="trustplane.method", action="policy.bundles.manage")
    assert (repair.effect, repair.reason) == (ALLOW, pb.DECISION_REASON_ALLOWED)
    keys = await one(server, admin, kind="trustplane.method", action="crypto.keys.create")
    assert (keys.effect, keys.reason) == (DENY, pb.DECISION_REASON_DENIED_BY_RULE)
    await put(server, admin, TOOLS)  # the RPC agrees: the bundle can still be replaced


async def test_check_on_a_suite_method_applies_the_callers_scopes(server, idp):
    """An admin token scoped to Check alone: its roles allow creating keys, its scopes do not,
    and Check on the method says so, as the RPC itself does."""
    scoped = bearer(idp.token(roles=["admin"], scope="policy.decisions.check"))
    decision = await one(server, scoped, kind="trustplane.method", action="crypto.keys.create")
    assert (decision.effect, decision.reason, decision.rule) == (
        DENY,
        pb.DECISION_REASON_SCOPE_MISSING,
        "",
    )
    status = await expect_error(create_key(server, scoped))
    assert status.code is grpc.StatusCode.PERMISSION_DENIED and "scopes" in status.message
    allowed = await one(server, scoped, kind="trustplane.method", action="policy.decisions.check")
    assert (allowed.effect, allowed.reason) == (ALLOW, pb.DECISION_REASON_ALLOWED)
    # Unscoped, the same roles are allowed (the decision cache keeps the two apart).
    admin = bearer(idp.token(roles=["admin"]))
    again = await one(server, admin, kind="trustplane.method", action="crypto.keys.create")
    assert (again.effect, again.reason) == (ALLOW, pb.DECISION_REASON_ALLOWED)


async def test_a_suite_method_cannot_wait_for_an_approval(server, admin):
    await put(
        server,
        admin,
        """
version: approvals-for-keys
resource_policies:
  - resource: trustplane.method
    rules:
      - name: keys-need-approval
        actions: [crypto.keys.create]
        roles: ["*"]
        effect: REQUIRE_APPROVAL
        approver_roles: [security]
""",
    )
    status = await expect_error(create_key(server, admin))
    assert status.code is grpc.StatusCode.PERMISSION_DENIED
    assert "requires an approval" in status.message
    decision = await one(server, admin, kind="trustplane.method", action="crypto.keys.create")
    assert (decision.effect, decision.rule) == (APPROVAL, "keys-need-approval")


async def test_explain_needs_a_resource_and_an_action(server, admin):
    status = await expect_error(stub(server).Explain(pb.ExplainRequest(), metadata=admin))
    assert (status.code, [f for f, _ in status.field_violations]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["resource", "action"],
    )


async def test_the_decision_cache_tells_true_from_one(server, admin, member):
    """Cache keys are type-faithful: {flag: true} and {flag: 1} are different inputs (True == 1
    in Python, not in CEL), so the second answer must not be the first one's cached."""
    await put(
        server,
        admin,
        """
version: flags
resource_policies:
  - resource: tool
    rules:
      - name: flagged
        actions: [invoke]
        roles: [member]
        effect: ALLOW
        condition: resource.attr.flag == true
""",
    )

    async def decide(flag):
        request = pb.CheckRequest(
            resources=[pb.Resource(kind="tool", id="t", attr=struct(flag=flag))], actions=["invoke"]
        )
        return (await stub(server).Check(request, metadata=member)).decisions[0]

    assert (await decide(True)).effect == ALLOW
    assert (await decide(1)).effect == DENY  # an int is not the boolean true
    assert (await decide(True)).effect == ALLOW


async def test_a_quota_holds_across_processes(start_server, make_config, idp):
    """Two server processes (one Postgres, one Redis) share every counter."""
    config = make_config()
    admin = bearer(idp.token(roles=["admin"]))
    async with start_server(config) as first, start_server(config) as second:
        await put(first, admin, TOOLS)
        session = pb.SessionContext(id=await new_session(first, agent_token(idp)))
        tokens = [agent_token(idp, jti=uuid.uuid4().hex) for _ in range(50)]
        servers = [first, second]
        results = await asyncio.gather(
            *(one(servers[i % 2], t, rid="shell", session=session) for i, t in enumerate(tokens))
        )
        assert sum(d.effect == ALLOW for d in results) == 10
        assert {d.reason for d in results if d.effect == DENY} == {
            pb.DECISION_REASON_QUOTA_EXCEEDED
        }


SCOPED_QUOTAS = """
version: scoped
resource_policies:
  - resource: tool
    rules:
      - name: anyone
        actions: [invoke]
        roles: ["*"]
        effect: ALLOW
quotas:
  - {name: per-tenant, resource: tool, actions: [invoke], condition: "resource.id == 't'",
     limit: 2, window_seconds: 3600, per: tenant}
  - {name: per-principal, resource: tool, actions: [invoke], condition: "resource.id == 'p'",
     limit: 2, window_seconds: 3600, per: principal}
  - {name: per-agent, resource: tool, actions: [invoke], condition: "resource.id == 'a'",
     limit: 2, window_seconds: 3600, per: agent}
"""


async def test_quotas_count_per_tenant_principal_and_agent(server, idp, admin):
    await put(server, admin, SCOPED_QUOTAS)
    u1, u2 = bearer(idp.token(sub="u1")), bearer(idp.token(sub="u2"))
    via_a = bearer(idp.token(sub="u1", act={"sub": "agent-a"}))
    via_b = bearer(idp.token(sub="u1", act={"sub": "agent-b"}))

    async def effects(calls):
        return [(await one(server, who, rid=tool)).effect for who, tool in calls]

    assert await effects([(u1, "t"), (u2, "t"), (u1, "t")]) == [ALLOW, ALLOW, DENY]
    assert await effects([(u1, "p"), (u1, "p"), (u1, "p"), (u2, "p")]) == [
        ALLOW,
        ALLOW,
        DENY,
        ALLOW,
    ]
    assert await effects([(via_a, "a"), (via_a, "a"), (via_a, "a"), (via_b, "a")]) == [
        ALLOW,
        ALLOW,
        DENY,
        ALLOW,
    ]
    usage = await stub(server).ListQuotaUsage(
        pb.ListQuotaUsageRequest(subject="agent-a"), metadata=admin
    )
    assert [(u.name, u.subject, u.used) for u in usage.usages] == [
        ("per-tenant", "", 2),
        ("per-principal", "agent-a", 0),
        ("per-agent", "agent-a", 2),
    ]
