"""The policy engine: bundle validation, decisions (table-driven from policy_cases.yaml),
delegation, explain traces, content hashes and the platform bundle."""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import cel
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from server import permissions
from server.errors import InvalidArgument
from server.policy import engine
from server.policy.engine import CompiledBundle
from server.policy.model import (
    Decision,
    Effect,
    Outcome,
    Principal,
    Reason,
    Request,
    Resource,
    Session,
    StepKind,
)

ROOT = Path(__file__).resolve().parents[2]
CASES_FILE = Path(__file__).with_name("policy_cases.yaml")
CASES: dict[str, Any] = yaml.safe_load(CASES_FILE.read_text())


# --- helpers ---------------------------------------------------------------------------------


@cache
def bundle_named(name: str) -> CompiledBundle:
    if name == "platform":
        return engine.platform_bundle()
    return engine.compile_bundle(CASES["bundles"][name])


def principal(doc: dict[str, Any]) -> Principal:
    return Principal(
        id=doc["id"],
        roles=frozenset(doc.get("roles", ())),
        attr=doc.get("attr", {}),
        tenant=doc.get("tenant", ""),
        type=doc.get("type", ""),
        chain=tuple(doc.get("chain", ())),
    )


def request_of(case: dict[str, Any]) -> Request:
    resource = case["resource"]
    session = case.get("session", {})
    return Request(
        principal=principal(case["principal"]),
        resource=Resource(resource["kind"], resource.get("id", ""), resource.get("attr", {})),
        action=case["action"],
        session=Session(
            session.get("id", ""), frozenset(session.get("labels", ())), session.get("attr", {})
        ),
        context=case.get("context", {}),
    )


def run_case(case: dict[str, Any], *, explain: bool = False) -> Decision:
    bundle = bundle_named(case["bundle"])
    request = request_of(case)
    if "delegates" in case:
        chain = [principal(d) for d in case["delegates"]]
        return engine.decide_chain(bundle, request, chain, explain=explain)
    return engine.decide(bundle, request, explain=explain)


def rejected(document: Any) -> dict[str, str]:
    """The field violations (field -> description) of a bundle that must be rejected."""
    with pytest.raises(InvalidArgument) as caught:
        engine.compile_bundle(document)
    return {v.field: v.description for v in caught.value.field_violations}


def base_document() -> dict[str, Any]:
    """A small valid bundle the bad-bundle tests break one way at a time."""
    return {
        "version": "base-1",
        "derived_roles": {
            "owner": {
                "parent_roles": ["member"],
                "condition": "resource.attr.owner == principal.id",
            }
        },
        "resource_policies": [
            {
                "resource": "data",
                "rules": [
                    {"name": "read", "actions": ["read"], "roles": ["member"], "effect": "ALLOW"},
                    {
                        "name": "owner-deletes",
                        "actions": ["delete"],
                        "derived_roles": ["owner"],
                        "effect": "ALLOW",
                    },
                ],
            },
            {
                "resource": "tool",
                "rules": [
                    {
                        "name": "risky",
                        "actions": ["invoke"],
                        "roles": ["agent"],
                        "effect": "REQUIRE_APPROVAL",
                        "condition": "resource.attr.risk > 5",
                        "approver_roles": ["admin"],
                        "approval_ttl_seconds": 300,
                    }
                ],
            },
        ],
        "tests": [
            {
                "principal": {"id": "m", "roles": ["member"]},
                "resource": {"kind": "data"},
                "action": "read",
                "expect": {"effect": "ALLOW"},
            },
            {
                "principal": {"id": "m", "roles": ["member"]},
                "resource": {"kind": "data", "attr": {"owner": "x"}},
                "action": "delete",
                "expect": {"effect": "DENY", "reason": "NO_MATCHING_RULE"},
            },
            {
                "principal": {"id": "a", "roles": ["agent"]},
                "resource": {"kind": "tool", "attr": {"risk": 9}},
                "action": "invoke",
                "expect": {"effect": "REQUIRE_APPROVAL"},
            },
        ],
    }


def rule(doc: dict[str, Any], policy: int, index: int) -> dict[str, Any]:
    rules: list[dict[str, Any]] = doc["resource_policies"][policy]["rules"]
    return rules[index]


# --- the table of decision cases ---------------------------------------------------------------


@pytest.mark.parametrize("case", CASES["cases"], ids=[c["name"] for c in CASES["cases"]])
def test_case(case):
    decision = run_case(case)
    expect = case["expect"]
    assert decision.effect is Effect(expect["effect"])
    assert decision.reason is Reason(expect["reason"])
    assert decision.allowed is (expect["effect"] == "ALLOW")
    if "rule" in expect:
        assert decision.rule == expect["rule"]
    if "principal_id" in expect:
        assert decision.principal_id == expect["principal_id"]
    assert decision.approver_roles == tuple(expect.get("approver_roles", ()))
    assert decision.approval_ttl_seconds == expect.get("approval_ttl_seconds")
    assert decision.bundle_version == bundle_named(case["bundle"]).content_hash
    assert decision.trace is None
    explained = run_case(case, explain=True)
    assert (explained.effect, explained.reason, explained.rule, explained.principal_id) == (
        decision.effect,
        decision.reason,
        decision.rule,
        decision.principal_id,
    )
    assert explained.trace


def test_the_case_table_covers_every_effect_and_reason():
    effects = {c["expect"]["effect"] for c in CASES["cases"]}
    reasons = {c["expect"]["reason"] for c in CASES["cases"]}
    assert effects == {e.value for e in Effect}
    assert reasons == {r.value for r in Reason if r.from_rules}
    assert any("delegates" in c for c in CASES["cases"])
    assert any(c.get("session", {}).get("labels") for c in CASES["cases"])


def test_the_case_bundles_carry_passing_embedded_tests():
    for name in CASES["bundles"]:
        results = engine.run_tests(bundle_named(name))
        assert results, name
        assert all(r.passed for r in results), [r.message for r in results]


# --- evaluation details ------------------------------------------------------------------------


def make(doc: dict[str, Any]) -> CompiledBundle:
    return engine.compile_bundle(doc)


def one_rule(condition: str, effect: str = "ALLOW", **extra: Any) -> dict[str, Any]:
    return {
        "resource_policies": [
            {
                "resource": "data",
                "rules": [
                    {
                        "name": "r",
                        "actions": ["*"],
                        "roles": ["*"],
                        "effect": effect,
                        "condition": condition,
                        **extra,
                    }
                ],
            }
        ]
    }


def data_request(**attr: Any) -> Request:
    return Request(Principal("p", frozenset({"member"})), Resource("data", "d", attr), "read")


@pytest.mark.parametrize(
    ("condition", "attr"),
    [
        ("resource.attr.size", {"size": 3}),  # not a bool
        ("resource.attr.note", {"note": None}),  # null is not false
        ("1 / resource.attr.n == 1", {"n": 0}),  # division by zero
        ("resource.attr.n + 'x' == 'x'", {"n": 1}),  # type error
        ("resource.attr.tags.size() > 0", {"tags": frozenset({"a"})}),  # not convertible
        ("resource.attr.missing == 1", {}),
    ],
)
@pytest.mark.parametrize("effect", ["ALLOW", "DENY"])
def test_every_evaluation_failure_is_a_deny(condition, attr, effect):
    decision = engine.decide(make(one_rule(condition, effect)), data_request(**attr))
    assert (decision.effect, decision.reason, decision.rule) == (
        Effect.DENY,
        Reason.CONDITION_ERROR,
        "r",
    )


def test_the_condition_error_is_explained_only_in_the_trace():
    bundle = make(one_rule("resource.attr.owner == 'x'"))
    plain = engine.decide(bundle, data_request())
    explained = engine.decide(bundle, data_request(), explain=True)
    assert plain.trace is None
    steps = [s for s in explained.trace if s.kind is StepKind.RULE]
    assert len(steps) == 1
    assert steps[0].condition is Outcome.ERROR
    assert "owner" in steps[0].detail


def test_comprehension_variables_are_not_unknown_variables():
    bundle = make(one_rule("principal.roles.exists(r, r.startsWith('mem')) && [1].all(x, x > 0)"))
    assert engine.decide(bundle, data_request()).allowed


def test_cel_error_absorption_follows_cel():
    # `||` with a true side absorbs the error, as CEL defines; the author opted in.
    bundle = make(one_rule("resource.attr.owner == 'x' || true"))
    assert engine.decide(bundle, data_request()).allowed


def test_a_derived_role_error_is_absorbed_when_a_plain_role_matches():
    doc: dict[str, Any] = {
        "derived_roles": {
            "owner": {
                "parent_roles": ["member"],
                "condition": "resource.attr.owner == principal.id",
            }
        },
        "resource_policies": [
            {
                "resource": "data",
                "rules": [
                    {
                        "name": "r",
                        "actions": ["read"],
                        "roles": ["member"],
                        "derived_roles": ["owner"],
                        "effect": "ALLOW",
                    },
                    {"name": "d", "actions": ["delete"], "derived_roles": ["*"], "effect": "ALLOW"},
                ],
            }
        ],
    }
    bundle = make(doc)
    assert engine.decide(bundle, data_request()).rule == "r"
    # Without the plain role only the erroring derived role is left: fail closed.
    outsider = dataclass_replace_roles(data_request(), frozenset())
    assert engine.decide(bundle, outsider).reason is Reason.NO_MATCHING_RULE
    doc["resource_policies"][0]["rules"][0]["roles"] = ["admin"]
    decision = engine.decide(make(doc), data_request())
    assert (decision.reason, decision.rule) == (Reason.CONDITION_ERROR, "r")
    # `*` stands for every declared derived role.
    owned = Request(
        Principal("p", frozenset({"member"})), Resource("data", "d", {"owner": "p"}), "delete"
    )
    assert engine.decide(bundle, owned).rule == "d"
    not_owned = Request(owned.principal, Resource("data", "d", {"owner": "q"}), "delete")
    assert engine.decide(bundle, not_owned).reason is Reason.NO_MATCHING_RULE
    unowned = Request(owned.principal, Resource("data", "d"), "delete")
    decision = engine.decide(bundle, unowned)
    assert (decision.reason, decision.rule) == (Reason.CONDITION_ERROR, "d")


def dataclass_replace_roles(request: Request, roles: frozenset[str]) -> Request:
    p = request.principal
    return Request(Principal(p.id, roles), request.resource, request.action)


def test_the_cel_variables_have_the_documented_shape():
    condition = (
        "principal.id == 'u' && principal.type == 'agent' && principal.tenant == 't' && "
        "principal.roles == ['a', 'b'] && principal.attr.level == 3 && principal.chain == ['x'] && "
        "resource.kind == 'data' && resource.id == 'd' && resource.attr.k == 'v' && "
        "request.action == 'read' && request.context.request_id == 'r1' && "
        "session.id == 's' && session.labels == ['l1', 'l2'] && session.attr.turn == 2"
    )
    request = Request(
        Principal("u", frozenset({"b", "a"}), {"level": 3}, "t", "agent", ("x",)),
        Resource("data", "d", {"k": "v"}),
        "read",
        Session("s", frozenset({"l2", "l1"}), {"turn": 2}),
        {"request_id": "r1"},
    )
    bundle = make(one_rule(condition))
    assert engine.decide(bundle, request).allowed
    other = Request(request.principal, request.resource, "read", request.session, {})
    assert engine.decide(bundle, other).reason is Reason.CONDITION_ERROR


def test_conditions_are_compiled_once(monkeypatch):
    bundle_named("documents")  # compiled (and cached) before the patch
    compiled: list[str] = []

    def no_compiling(source):
        compiled.append(source)
        raise AssertionError(f"compiled at decision time: {source}")

    monkeypatch.setattr(cel, "compile", no_compiling)
    cases = [c for c in CASES["cases"] if c["bundle"] == "documents"]
    decided = [run_case(c) for c in cases]
    assert compiled == []
    assert [d.effect.value for d in decided] == [c["expect"]["effect"] for c in cases]


def test_the_trace_lists_every_rule_in_order():
    bundle = bundle_named("documents")
    request = Request(Principal("ann", frozenset({"member"})), Resource("data", "d1"), "read")
    decision = engine.decide(bundle, request, explain=True)
    rules = [s.name for s in decision.trace if s.kind is StepKind.RULE]
    assert rules == [r.name for r in bundle.bundle.resource_policies[0].rules]
    by_name = {s.name: s for s in decision.trace if s.kind is StepKind.RULE}
    assert by_name["readers-read"].actions_matched is True
    assert by_name["readers-read"].roles_matched is Outcome.TRUE
    assert by_name["readers-read"].condition is Outcome.NO_CONDITION
    assert by_name["admins-do-anything"].roles_matched is Outcome.FALSE
    assert by_name["owners-edit"].actions_matched is False
    assert by_name["secrets-need-clearance"].condition is Outcome.FALSE


def test_decide_chain_explains_each_principal():
    bundle = bundle_named("tools")
    request = Request(Principal("alice", frozenset({"user"})), Resource("tool", "x"), "configure")
    decision = engine.decide_chain(
        bundle, request, [Principal("agent-1", frozenset({"agent"}))], explain=True
    )
    heads = [s.name for s in decision.trace if s.kind is StepKind.PRINCIPAL]
    results = [(s.name, s.effect) for s in decision.trace if s.kind is StepKind.RESULT]
    assert heads == ["alice", "agent-1"]
    assert results == [("alice", Effect.ALLOW), ("agent-1", Effect.DENY)]
    assert decision.principal_id == "agent-1"


def test_decide_chain_without_delegates_is_decide():
    bundle = bundle_named("tools")
    request = Request(Principal("alice", frozenset({"user"})), Resource("tool", "x"), "configure")
    assert engine.decide_chain(bundle, request, []) == engine.decide(bundle, request)


RULE_ORDER_CASES = [c for c in CASES["cases"] if c["bundle"] == "documents"]


@settings(max_examples=25, deadline=None)
@given(st.randoms(use_true_random=False))
def test_effect_and_reason_do_not_depend_on_rule_order(rnd):
    doc = copy.deepcopy(CASES["bundles"]["documents"])
    doc.pop("tests")
    rnd.shuffle(doc["resource_policies"][0]["rules"])
    shuffled = engine.compile_bundle(doc)
    for case in RULE_ORDER_CASES:
        expected = run_case(case)
        request = request_of(case)
        if "delegates" in case:
            got = engine.decide_chain(shuffled, request, [principal(d) for d in case["delegates"]])
        else:
            got = engine.decide(shuffled, request)
        assert (got.effect, got.reason) == (expected.effect, expected.reason), case["name"]


# --- bundle validation -------------------------------------------------------------------------


def test_the_base_document_is_valid():
    bundle = engine.compile_bundle(base_document())
    assert bundle.version == "base-1"
    assert bundle.resource_kinds == {"data", "tool"}
    assert all(r.passed for r in engine.run_tests(bundle))


def _set(path: str, value: Any):
    def mutate(doc):
        target = doc
        *parents, last = re.findall(r"[^.\[\]]+", path)
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is _DELETE:
            del target[int(last) if last.isdigit() else last]
        elif last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value

    return mutate


_DELETE = object()

BAD_BUNDLES = [
    # (id, mutation, field, description fragment)
    ("unknown top-level key", _set("policies", []), "policies", "unknown field"),
    (
        "unknown rule key",
        _set("resource_policies[0].rules[0].efect", "ALLOW"),
        "resource_policies[0].rules[0].efect",
        "unknown field",
    ),
    ("version not a string", _set("version", 3), "version", "must be a string"),
    (
        "actions not a list",
        _set("resource_policies[0].rules[0].actions", "read"),
        "resource_policies[0].rules[0].actions",
        "must be a list",
    ),
    (
        "empty actions",
        _set("resource_policies[0].rules[0].actions", []),
        "resource_policies[0].rules[0].actions",
        "must not be empty",
    ),
    (
        "bad action wildcard",
        _set("resource_policies[0].rules[0].actions", ["read", "re*d"]),
        "resource_policies[0].rules[0].actions[1]",
        "not an action pattern",
    ),
    (
        "unknown effect",
        _set("resource_policies[0].rules[0].effect", "PERMIT"),
        "resource_policies[0].rules[0].effect",
        "unknown effect",
    ),
    (
        "missing rule name",
        _set("resource_policies[0].rules[0].name", _DELETE),
        "resource_policies[0].rules[0].name",
        "required",
    ),
    (
        "duplicate rule name",
        _set("resource_policies[0].rules[1].name", "read"),
        "resource_policies[0].rules[1].name",
        "duplicate rule name",
    ),
    (
        "duplicate resource policy",
        _set("resource_policies[1].resource", "data"),
        "resource_policies[1].resource",
        "duplicate policy",
    ),
    (
        "rule without roles",
        _set("resource_policies[0].rules[0].roles", []),
        "resource_policies[0].rules[0]",
        "needs roles or derived_roles",
    ),
    (
        "role not a string",
        _set("resource_policies[0].rules[0].roles", ["member", 7]),
        "resource_policies[0].rules[0].roles[1]",
        "must be a string",
    ),
    (
        "approval without approver roles",
        _set("resource_policies[1].rules[0].approver_roles", _DELETE),
        "resource_policies[1].rules[0].approver_roles",
        "required when effect is REQUIRE_APPROVAL",
    ),
    (
        "approval with empty approver roles",
        _set("resource_policies[1].rules[0].approver_roles", []),
        "resource_policies[1].rules[0].approver_roles",
        "at least one role",
    ),
    (
        "approval ttl not an integer",
        _set("resource_policies[1].rules[0].approval_ttl_seconds", True),
        "resource_policies[1].rules[0].approval_ttl_seconds",
        "must be an integer",
    ),
    (
        "approval ttl out of range",
        _set("resource_policies[1].rules[0].approval_ttl_seconds", 0),
        "resource_policies[1].rules[0].approval_ttl_seconds",
        "must be in",
    ),
    (
        "approvers on an allow rule",
        _set("resource_policies[0].rules[0].approver_roles", ["admin"]),
        "resource_policies[0].rules[0].approver_roles",
        "only valid with effect REQUIRE_APPROVAL",
    ),
    (
        "cel syntax error",
        _set("resource_policies[1].rules[0].condition", "resource.attr.risk >"),
        "resource_policies[1].rules[0].condition",
        "Syntax error",
    ),
    (
        "cel unknown variable",
        _set("resource_policies[1].rules[0].condition", "user.risk > 5"),
        "resource_policies[1].rules[0].condition",
        "unknown variable 'user'",
    ),
    (
        "cel not a string",
        _set("resource_policies[1].rules[0].condition", True),
        "resource_policies[1].rules[0].condition",
        "must be a string",
    ),
    (
        "derived role cel syntax error",
        _set("derived_roles.owner.condition", "resource.attr.owner = principal.id"),
        "derived_roles.owner.condition",
        "CEL",
    ),
    (
        "derived role without parents",
        _set("derived_roles.owner.parent_roles", []),
        "derived_roles.owner.parent_roles",
        "must not be empty",
    ),
    (
        "unknown derived role",
        _set("resource_policies[0].rules[1].derived_roles", ["owner", "ownr"]),
        "resource_policies[0].rules[1].derived_roles[1]",
        "unknown derived role 'ownr'",
    ),
    (
        "test with an unknown effect",
        _set("tests[1].expect.effect", "MAYBE"),
        "tests[1].expect.effect",
        "unknown effect",
    ),
    (
        "test without a principal id",
        _set("tests[0].principal", {"roles": ["member"]}),
        "tests[0].principal.id",
        "required",
    ),
    (
        "failing embedded test",
        _set("tests[2].expect.effect", "DENY"),
        "tests[2]",
        "expected DENY, got REQUIRE_APPROVAL",
    ),
    (
        "embedded test with the wrong reason",
        _set("tests[1].expect.reason", "DENIED_BY_RULE"),
        "tests[1]",
        "expected reason DENIED_BY_RULE, got DENY (NO_MATCHING_RULE)",
    ),
    (
        "embedded test against a weakened rule",
        _set("resource_policies[0].rules[0].roles", ["admin"]),
        "tests[0]",
        "expected ALLOW, got DENY (NO_MATCHING_RULE)",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "field", "fragment"),
    [b[1:] for b in BAD_BUNDLES],
    ids=[b[0] for b in BAD_BUNDLES],
)
def test_a_bad_bundle_is_rejected_with_the_field(mutate, field, fragment):
    doc = base_document()
    mutate(doc)
    violations = rejected(doc)
    assert field in violations, violations
    assert fragment in violations[field]


def test_every_violation_is_reported_at_once():
    doc = base_document()
    rule(doc, 0, 0)["effect"] = "PERMIT"
    rule(doc, 1, 0)["condition"] = "resource.attr.risk >"
    rule(doc, 0, 1)["derived_roles"] = ["nobody"]
    with pytest.raises(InvalidArgument) as caught:
        engine.compile_bundle(doc)
    fields = {v.field for v in caught.value.field_violations}
    assert fields == {
        "resource_policies[0].rules[0].effect",
        "resource_policies[1].rules[0].condition",
        "resource_policies[0].rules[1].derived_roles[0]",
    }
    assert caught.value.message.startswith("invalid policy bundle: ")


def test_embedded_tests_run_only_on_an_otherwise_valid_bundle():
    doc = base_document()
    doc["tests"][2]["expect"]["effect"] = "DENY"
    rule(doc, 0, 0)["effect"] = "PERMIT"
    assert set(rejected(doc)) == {"resource_policies[0].rules[0].effect"}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("version: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        ("a: &x [1]\nb: *x\n", "aliases are not allowed"),
        ("version: a\nversion: b\n", "duplicate key"),
        ('{"version": "a", "version": "b"}', "duplicate key"),
        ('{"version": NaN}', "not valid JSON"),
        ("{not json", "not valid JSON"),
        ("1: x\n", "mapping keys must be strings"),
        ("version: !!binary aGk=\n", "not representable as JSON"),
    ],
)
def test_a_document_that_does_not_parse_is_rejected(text, fragment):
    with pytest.raises(InvalidArgument) as caught:
        engine.parse_bundle(text)
    (violation,) = caught.value.field_violations
    assert violation.field == engine.DOCUMENT
    assert fragment in violation.description


def test_oversized_and_non_utf8_documents_are_rejected():
    with pytest.raises(InvalidArgument, match="larger than"):
        engine.parse_bundle("#" * (engine.MAX_BUNDLE_BYTES + 1))
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        engine.parse_bundle(b"version: \xff\n")
    with pytest.raises(InvalidArgument) as caught:
        engine.parse_bundle("{}", format="toml")
    assert caught.value.field_violations[0].field == "format"


# --- content hash ------------------------------------------------------------------------------


def test_the_content_hash_is_the_same_for_yaml_and_json():
    doc = base_document()
    from_yaml = engine.parse_bundle(yaml.safe_dump(doc, sort_keys=False))
    from_json = engine.parse_bundle(json.dumps(doc, indent=2))
    from_bytes = engine.parse_bundle(json.dumps(doc).encode())
    assert from_yaml.content_hash == from_json.content_hash == from_bytes.content_hash
    assert re.fullmatch(r"[0-9a-f]{64}", from_yaml.content_hash)


def test_the_content_hash_changes_with_the_content():
    doc = base_document()
    before = engine.compile_bundle(doc).content_hash
    rule(doc, 0, 0)["actions"] = ["read", "list"]
    assert engine.compile_bundle(doc).content_hash != before


def test_yaml_scalars_parse_as_json_would():
    text = "version: 2024-01-01\ndescription: on\n"
    as_json = '{"version": "2024-01-01", "description": "on"}'
    assert engine.load_document(text) == json.loads(as_json)
    assert engine.parse_bundle(text).content_hash == engine.parse_bundle(as_json).content_hash
    assert engine.load_document("a: 010\nb: 1e3\nc: -2.5\nd: ~\ne: yes\nf: .inf\n") == {
        "a": "010",
        "b": 1000.0,
        "c": -2.5,
        "d": None,
        "e": "yes",
        "f": ".inf",
    }


def _reordered(value: Any, rnd: Any) -> Any:
    if isinstance(value, dict):
        keys = list(value)
        rnd.shuffle(keys)
        return {k: _reordered(value[k], rnd) for k in keys}
    if isinstance(value, list):
        return [_reordered(v, rnd) for v in value]
    return value


@settings(max_examples=30, deadline=None)
@given(st.randoms(use_true_random=False))
def test_the_content_hash_ignores_key_order(rnd):
    doc = base_document()
    shuffled = _reordered(doc, rnd)
    assert engine.content_hash(shuffled) == engine.content_hash(doc)
    text = yaml.safe_dump(shuffled, sort_keys=False)
    assert engine.parse_bundle(text).content_hash == engine.compile_bundle(doc).content_hash


# --- the platform bundle -----------------------------------------------------------------------


def _declared_permissions() -> set[str]:
    found: set[str] = set()
    for proto in (ROOT / "protos").rglob("*.proto"):
        found.update(re.findall(r'permission:\s*"([^"]+)"', proto.read_text()))
    return found


PERMISSIONS = sorted(
    _declared_permissions()
    | {
        "auth.whoami",
        "auth.whoami.extra",
        "sessions.get",
        "sessions.list",
        "sessions.watch",
        "sessions.create",
        "sessions.update",
        "sessions.delete",
        "sessions.cancel",
        "audit.read",
        "audit.append",
        "audit.export",
        "policy.check",
        "policy.explain",
        "policy.write",
        "approvals.request",
        "approvals.approve",
        "tokens.revoke",
        "crypto.keys.use",
        "crypto.keys.rotate",
        "tenants.manage",
        "tenants.admin",
        "tenants.transfer",
        "get",
        "x.getter",
        "x.get.more",
        "",
    }
)


@pytest.mark.parametrize("role", [*permissions.ROLE_GRANTS, "guest"])
def test_the_platform_bundle_agrees_with_the_role_table(role):
    bundle = engine.platform_bundle()
    grants = permissions.ROLE_GRANTS.get(role, ())
    for permission in PERMISSIONS:
        request = Request(
            Principal("p", frozenset({role})), Resource("trustplane.method"), permission
        )
        decision = engine.decide(bundle, request)
        assert decision.allowed is permissions.any_matches(grants, permission), permission
        assert decision.reason is (Reason.ALLOWED if decision.allowed else Reason.NO_MATCHING_RULE)


def test_the_platform_comparison_is_not_vacuous():
    assert len(_declared_permissions()) >= 5
    for role, grants in permissions.ROLE_GRANTS.items():
        outcomes = {permissions.any_matches(grants, p) for p in PERMISSIONS}
        assert True in outcomes, role
        if role != "owner":
            assert False in outcomes, role


def test_the_platform_bundle_unions_a_principals_roles():
    bundle = engine.platform_bundle()
    both = Principal("p", frozenset({"viewer", "member"}))
    request = Request(both, Resource("trustplane.method"), "sessions.create")
    assert engine.decide(bundle, request).allowed
    assert engine.platform_bundle() is bundle  # compiled once
    other = Request(both, Resource("tool", "x"), "sessions.get")
    assert engine.decide(bundle, other).reason is Reason.NO_MATCHING_RULE


def test_conditions_in_one_decision_see_every_field_they_read():
    # Each decision converts only the fields its conditions read; later conditions that read
    # more fields of the same variable must still see them.
    doc = {
        "resource_policies": [
            {
                "resource": "data",
                "rules": [
                    {
                        "name": f"r{i}",
                        "actions": ["read"],
                        "roles": ["*"],
                        "effect": "ALLOW",
                        "condition": condition,
                    }
                    for i, condition in enumerate(
                        [
                            "'l1' in session.labels",
                            "'l1' in session.labels && session.attr.turn == 2",
                            "has(session.labels) && session['id'] == 's'",
                            "!has(session.attr.nope) && principal.id == 'p'",
                        ]
                    )
                ],
            }
        ]
    }
    request = Request(
        Principal("p", frozenset()),
        Resource("data", "d"),
        "read",
        Session("s", frozenset({"l1"}), {"turn": 2}),
    )
    decision = engine.decide(make(doc), request, explain=True)
    outcomes = [s.condition for s in decision.trace if s.kind is StepKind.RULE]
    assert outcomes == [Outcome.TRUE] * 4
    assert decision.allowed


# --- quotas ----------------------------------------------------------------------------------


def quota_document() -> dict[str, Any]:
    doc = base_document()
    doc["quotas"] = [
        {
            "name": "shell-per-session",
            "resource": "tool",
            "actions": ["invoke"],
            "condition": "resource.id == 'shell.exec'",
            "limit": 20,
            "window_seconds": 3600,
            "per": "session",
        },
        {
            "name": "tokens-per-tenant",
            "resource": "tool",
            "actions": ["*"],
            "limit": 5000,
            "window_seconds": 86400,
            "per": "tenant",
        },
        {
            "name": "exports-per-agent",
            "resource": "data",
            "actions": ["export.*"],
            "condition": "resource.attr.rows > 10",
            "limit": 3,
            "window_seconds": 60,
            "per": "agent",
        },
    ]
    return doc


QUOTA_CASES = [
    # (id, resource kind, resource id, attr, action, expected quota names, failed quota)
    (
        "condition true",
        "tool",
        "shell.exec",
        {},
        "invoke",
        ["shell-per-session", "tokens-per-tenant"],
        None,
    ),
    ("condition false", "tool", "search", {}, "invoke", ["tokens-per-tenant"], None),
    ("wildcard action", "tool", "search", {}, "configure", ["tokens-per-tenant"], None),
    ("other kind", "crypto.key", "k", {}, "invoke", [], None),
    ("prefix action", "data", "d", {"rows": 11}, "export.csv", ["exports-per-agent"], None),
    ("prefix mismatch", "data", "d", {"rows": 11}, "exporter", [], None),
    ("missing attribute fails closed", "data", "d", {}, "export.csv", [], "exports-per-agent"),
]


@pytest.mark.parametrize(
    ("kind", "rid", "attr", "action", "names", "failed"),
    [c[1:] for c in QUOTA_CASES],
    ids=[c[0] for c in QUOTA_CASES],
)
def test_quotas_that_apply(kind, rid, attr, action, names, failed):
    bundle = engine.compile_bundle(quota_document())
    request = Request(Principal("a", frozenset({"agent"})), Resource(kind, rid, attr), action)
    match = engine.quotas_for(bundle, request)
    assert [q.name for q in match.quotas] == names
    assert (match.failed.name if match.failed else None) == failed
    if failed:
        assert match.detail


def test_quotas_are_part_of_the_bundle_and_its_hash():
    bundle = engine.compile_bundle(quota_document())
    assert [q.name for q in bundle.bundle.quotas] == [
        "shell-per-session",
        "tokens-per-tenant",
        "exports-per-agent",
    ]
    quota = bundle.quota("shell-per-session")
    assert quota is not None and quota.limit == 20 and quota.per.value == "session"
    assert bundle.content_hash != engine.compile_bundle(base_document()).content_hash


BAD_QUOTAS = [
    ("limit zero", "limit", 0, "quotas[0].limit", "must be in 1.."),
    ("limit not an int", "limit", "10", "quotas[0].limit", "must be an integer"),
    ("window too long", "window_seconds", 10**9, "quotas[0].window_seconds", "must be in 1.."),
    ("unknown scope", "per", "galaxy", "quotas[0].per", "must be one of"),
    ("bad condition", "condition", "resource.id ==", "quotas[0].condition", "CEL"),
    ("unknown variable", "condition", "user.id == 'x'", "quotas[0].condition", "unknown variable"),
    ("bad action", "actions", ["a*b"], "quotas[0].actions[0]", "not an action pattern"),
    ("unknown key", "budget", 1, "quotas[0].budget", "unknown field"),
]


@pytest.mark.parametrize(
    ("key", "value", "field", "fragment"),
    [b[1:] for b in BAD_QUOTAS],
    ids=[b[0] for b in BAD_QUOTAS],
)
def test_a_bad_quota_is_rejected_with_the_field(key, value, field, fragment):
    doc = quota_document()
    doc["quotas"][0][key] = value
    violations = rejected(doc)
    assert field in violations, violations
    assert fragment in violations[field]


def test_quota_names_are_unique_and_fields_required():
    doc = quota_document()
    doc["quotas"][1]["name"] = "shell-per-session"
    del doc["quotas"][2]["per"]
    violations = rejected(doc)
    assert "duplicate quota name" in violations["quotas[1].name"]
    assert violations["quotas[2].per"] == "required"


def test_the_bundles_in_docs_policy_md_are_valid():
    """Every complete bundle in the policy reference compiles and passes its own tests."""
    text = (ROOT / "docs" / "policy.md").read_text()
    blocks = re.findall(r"```yaml\n(version: .*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        bundle = engine.parse_bundle(block)
        assert all(r.passed for r in engine.run_tests(bundle)), bundle.version
