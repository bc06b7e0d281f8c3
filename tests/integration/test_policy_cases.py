"""The engine's decision table (tests/unit/policy_cases.yaml) again, end to end: each case's
bundle is put and activated through PolicyService, and each case is asked as a Check for that
principal (by an administrator holding `policy.decisions.check_others`). The wire path adds
Struct decoding (numbers, nested values, RFC 3339 strings), delegates, sessions, the decision
cache and the platform bundle for `trustplane.method`; the answers must not change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import struct_pb2
from trustplane.policy.v1 import policy_pb2 as pb
from trustplane.policy.v1 import policy_pb2_grpc

from tests.support.tokens import bearer

CASES: dict[str, Any] = yaml.safe_load(
    (Path(__file__).parents[1] / "unit" / "policy_cases.yaml").read_text()
)


def struct(values: dict[str, Any] | None) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values or {})
    return message


def principal(doc: dict[str, Any]) -> pb.Principal:
    return pb.Principal(
        id=doc["id"],
        roles=doc.get("roles", []),
        attr=struct(doc.get("attr")),
        type=doc.get("type", ""),
    )


def check_request(case: dict[str, Any]) -> pb.CheckRequest:
    resource = case["resource"]
    session = case.get("session", {})
    return pb.CheckRequest(
        principal=principal(case["principal"]),
        delegates=[principal(d) for d in case.get("delegates", [])],
        resources=[
            pb.Resource(
                kind=resource["kind"], id=resource.get("id", ""), attr=struct(resource.get("attr"))
            )
        ],
        actions=[case["action"]],
        # Session ids name stored sessions on the wire: the cases' sessions are sent as the
        # labels and attributes of a call outside any stored session (the same engine input
        # but for `session.id`, which no case reads).
        session=pb.SessionContext(
            labels=session.get("labels", []), attr=struct(session.get("attr"))
        ),
        context=struct(case.get("context")),
    )


def mismatch(case: dict[str, Any], decision: pb.Decision, version: str) -> str:
    expect = case["expect"]
    got = {
        "effect": pb.Effect.Name(decision.effect).removeprefix("EFFECT_"),
        "reason": pb.DecisionReason.Name(decision.reason).removeprefix("DECISION_REASON_"),
        "rule": decision.rule or None,
        "principal_id": decision.principal_id,
        "approver_roles": list(decision.approval.approver_roles),
        "approval_ttl_seconds": decision.approval.ttl.seconds,
    }
    wrong = {k: (v, got[k]) for k, v in expect.items() if got[k] != v}
    if case["bundle"] != "platform" and decision.version_id != version:
        wrong["version_id"] = (version, decision.version_id)
    return f"{case['name']}: {wrong}" if wrong else ""


@pytest.mark.parametrize("bundle", sorted(CASES["bundles"]))
async def test_the_case_table_through_check(server, idp, bundle):
    admin = bearer(idp.token(roles=["admin"]))
    stub = policy_pb2_grpc.PolicyServiceStub(server.channel)
    put = pb.PutBundleRequest(source=json.dumps(CASES["bundles"][bundle]), activate=True)
    version = (await stub.PutBundle(put, metadata=admin)).bundle.version_id
    cases = [c for c in CASES["cases"] if c["bundle"] in (bundle, "platform")]
    assert cases
    problems = []
    for case in cases:
        for _ in range(2):  # the second answer comes from the decision cache
            answer = await stub.Check(check_request(case), metadata=admin)
            problems.append(mismatch(case, answer.decisions[0], version))
    assert [p for p in problems if p] == []
