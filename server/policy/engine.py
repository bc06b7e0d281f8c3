"""The policy engine: parse and validate a bundle, compile its CEL once, decide requests.

Pure domain code: no I/O, no gRPC. `parse_bundle` (YAML or JSON text) and `compile_bundle` (an
already parsed document) return a `CompiledBundle` or raise `InvalidArgument` whose field
violations point into the document (`resource_policies[1].rules[0].condition`). A bundle is
accepted only when its schema is valid, every CEL condition compiles, every derived role it
names exists and every embedded test passes.

Decision semantics (`decide`):

* Only the policy of the request's resource kind is consulted; no policy, or no rule that
  applies, is the default deny (`NO_MATCHING_RULE`).
* A rule applies when an action pattern matches, the principal holds one of its roles or one of
  its derived roles (derived roles are resolved first, with their own conditions), and its
  condition is true.
* Deny overrides: any applying DENY wins, then REQUIRE_APPROVAL, then ALLOW. Among rules of the
  same effect the first in document order is the one named.
* Fail closed: when a condition the decision needs cannot be evaluated (a missing key, a type
  error, a result that is not a bool) the decision is DENY / `CONDITION_ERROR` naming the rule,
  whatever other ALLOW or REQUIRE_APPROVAL rules say. Only a cleanly matching DENY rule takes
  precedence (`DENIED_BY_RULE`). Conditions guard optional attributes with `has(...)`. As in
  CEL itself, `||` and `&&` absorb an error when the other side decides the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Final

import cel
import yaml

from server.errors import FieldViolation, InvalidArgument
from server.permissions import ROLE_GRANTS
from server.policy.model import (
    WILDCARD,
    BundleTest,
    Decision,
    DerivedRole,
    Effect,
    Expectation,
    Outcome,
    PolicyBundle,
    Principal,
    Quota,
    QuotaScope,
    Reason,
    Request,
    Resource,
    ResourcePolicy,
    Rule,
    Session,
    StepKind,
    TraceStep,
)

MAX_BUNDLE_BYTES: Final = 1 << 20
DEFAULT_APPROVAL_TTL_SECONDS: Final = 3600
MAX_APPROVAL_TTL_SECONDS: Final = 7 * 24 * 3600
VARIABLES: Final = ("principal", "resource", "request", "session")
"""The CEL variables a condition may read."""

DOCUMENT = "document"
"""The field path of violations about the document as a whole (it does not parse)."""

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]*")
_MACRO_BINDING = r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*(?:[A-Za-z_]\w*\s*,\s*)?{}\s*,"


# --- public API ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseResult:
    """The outcome of one embedded test: `message` says what differed when it failed."""

    index: int
    name: str
    passed: bool
    decision: Decision
    message: str = ""


class CompiledBundle:
    """A validated bundle with its conditions compiled, indexed for `decide`. Immutable."""

    __slots__ = ("_derived", "_policies", "_quotas", "bundle")

    def __init__(
        self,
        bundle: PolicyBundle,
        policies: Mapping[str, tuple[_CompiledRule, ...]],
        derived: Mapping[str, _CompiledDerivedRole],
        quotas: Sequence[_CompiledQuota] = (),
    ) -> None:
        self.bundle = bundle
        self._policies = dict(policies)
        self._derived = dict(derived)
        self._quotas = tuple(quotas)

    @property
    def content_hash(self) -> str:
        """The immutable version id: SHA-256 (hex) of the canonical JSON of the document."""
        return self.bundle.content_hash

    @property
    def version(self) -> str:
        """The author's free-text version label."""
        return self.bundle.version

    @property
    def resource_kinds(self) -> frozenset[str]:
        return frozenset(self._policies)

    def has_policy(self, kind: str) -> bool:
        """Whether the bundle has a resource policy for `kind`."""
        return kind in self._policies

    def quota(self, name: str) -> Quota | None:
        """The quota named `name`, if the bundle defines it."""
        return next((q.quota for q in self._quotas if q.quota.name == name), None)

    def __repr__(self) -> str:
        return f"CompiledBundle(version={self.version!r}, content_hash={self.content_hash!r})"


def parse_bundle(text: str | bytes, *, format: str | None = None) -> CompiledBundle:
    """Parse, validate and compile a bundle from YAML or JSON text.

    `format` is "yaml" or "json"; by default text starting with `{` is JSON, anything else YAML.
    YAML is read with JSON's scalar types only (no timestamps, no `yes`/`no` booleans, no octal
    or sexagesimal numbers), without aliases and without duplicate keys, so the same document
    in either syntax parses to the same value and has the same content hash.
    """
    return compile_bundle(load_document(text, format=format))


def load_document(text: str | bytes, *, format: str | None = None) -> Any:
    """The parsed (not yet validated) document; InvalidArgument on field `document` if the
    text is too large or does not parse."""
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BUNDLE_BYTES:
        raise _invalid(DOCUMENT, f"larger than {MAX_BUNDLE_BYTES} bytes")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _invalid(DOCUMENT, f"not UTF-8 (byte {exc.start})") from None
    if format is None:
        format = "json" if text.lstrip().startswith("{") else "yaml"
    if format == "json":
        return _load_json(text)
    if format == "yaml":
        return _load_yaml(text)
    raise _invalid("format", "must be 'yaml' or 'json'")


def content_hash(document: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of a parsed document: sorted keys, no whitespace,
    UTF-8. Key order and YAML-versus-JSON syntax do not change it."""
    try:
        canonical = json.dumps(
            document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError, RecursionError) as exc:
        raise _invalid(DOCUMENT, f"not representable as JSON: {exc}") from None
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def compile_bundle(document: Any) -> CompiledBundle:
    """Validate and compile a parsed bundle document; InvalidArgument lists every violation.

    Embedded tests run only once everything else is valid; each failing test is a violation on
    `tests[i]`.
    """
    digest = content_hash(document)
    checker = _Checker()
    bundle, policies, derived, quotas = checker.bundle(document, digest)
    if checker.violations:
        raise InvalidArgument.fields(*checker.violations, message=_message(checker.violations))
    compiled = CompiledBundle(bundle, policies, derived, quotas)
    failures = [
        FieldViolation(f"tests[{result.index}]", result.message)
        for result in run_tests(compiled)
        if not result.passed
    ]
    if failures:
        raise InvalidArgument.fields(*failures, message=_message(failures))
    return compiled


def run_tests(bundle: CompiledBundle) -> tuple[CaseResult, ...]:
    """Run the bundle's embedded tests (for `policy test`-style tooling; `compile_bundle`
    already refuses a bundle whose tests fail)."""
    return tuple(_run_test(bundle, index, test) for index, test in enumerate(bundle.bundle.tests))


def decide(bundle: CompiledBundle, request: Request, *, explain: bool = False) -> Decision:
    """Decide one request. With `explain`, the decision carries the trace of every rule of the
    resource kind's policy; without it no trace is built."""
    return _Evaluation(bundle, request, explain).run()


@dataclass(frozen=True)
class QuotaMatch:
    """The quotas that apply to a request, in bundle order; `failed` names a quota whose
    condition could not be evaluated (the decision must then fail closed)."""

    quotas: tuple[Quota, ...] = ()
    failed: Quota | None = None
    detail: str = ""


def quotas_for(bundle: CompiledBundle, request: Request) -> QuotaMatch:
    """The quotas of `bundle` that apply to `request`: resource kind and action match and the
    condition (if any) is true. Rules decide first; the caller applies quotas only to what the
    rules allow."""
    candidates = [
        q
        for q in bundle._quotas
        if q.quota.resource == request.resource.kind and q.matches_action(request.action)
    ]
    if not candidates:
        return _NO_QUOTAS
    evaluation = _Evaluation(bundle, request, explain=False)
    applying: list[Quota] = []
    for compiled in candidates:
        if compiled.condition is None:
            applying.append(compiled.quota)
            continue
        outcome, detail = evaluation._condition(compiled.condition)
        if outcome is Outcome.ERROR:
            return QuotaMatch(tuple(applying), compiled.quota, detail)
        if outcome is Outcome.TRUE:
            applying.append(compiled.quota)
    return QuotaMatch(tuple(applying))


_NO_QUOTAS: Final = QuotaMatch()


def decide_chain(
    bundle: CompiledBundle,
    request: Request,
    chain: Sequence[Principal],
    *,
    explain: bool = False,
) -> Decision:
    """Decide for `request.principal` acting through the delegation `chain` (the other
    principals of an `act` chain): ALLOW only if every principal is allowed. The most
    restrictive effect wins (DENY > REQUIRE_APPROVAL > ALLOW); on a tie the earliest principal,
    `request.principal` first, is the one reported."""
    worst = decide(bundle, request, explain=explain)
    steps: list[TraceStep] = []
    if explain:
        steps += _principal_steps(request.principal, worst)
    for principal in chain:
        if worst.effect is Effect.DENY and not explain:
            break
        decision = decide(
            bundle, dataclasses.replace(request, principal=principal), explain=explain
        )
        if explain:
            steps += _principal_steps(principal, decision)
        if decision.effect.severity > worst.effect.severity:
            worst = decision
    return dataclasses.replace(worst, trace=tuple(steps)) if explain else worst


def platform_bundle() -> CompiledBundle:
    """The built-in bundle for resource kind `trustplane.method` (action: the permission an RPC
    declares): the tenant roles viewer, member, admin and owner, as `server.permissions`'
    ROLE_GRANTS. Compiled once."""
    return _platform_bundle()


# --- compiled forms --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Condition:
    source: str
    program: cel.Program
    # The variables the expression reads, each with the fields it reads (None: all of them).
    variables: tuple[tuple[str, frozenset[str] | None], ...]


@dataclass(frozen=True, slots=True)
class _CompiledDerivedRole:
    role: DerivedRole
    any_parent: bool
    condition: _Condition | None


@dataclass(frozen=True, slots=True)
class _CompiledQuota:
    quota: Quota
    any_action: bool
    exact_actions: frozenset[str]
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    condition: _Condition | None

    def matches_action(self, action: str) -> bool:
        return (
            self.any_action
            or action in self.exact_actions
            or action.startswith(self.prefixes)
            or action.endswith(self.suffixes)
        )


def _compile_quota(quota: Quota, condition: _Condition | None) -> _CompiledQuota:
    patterns = quota.actions
    return _CompiledQuota(
        quota=quota,
        any_action=WILDCARD in patterns,
        exact_actions=frozenset(p for p in patterns if "*" not in p),
        prefixes=tuple(p[:-1] for p in patterns if p != WILDCARD and p.endswith(".*")),
        suffixes=tuple(p[1:] for p in patterns if p != WILDCARD and p.startswith("*.")),
        condition=condition,
    )


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    rule: Rule
    any_action: bool
    exact_actions: frozenset[str]
    prefixes: tuple[str, ...]  # "sessions.*" -> "sessions."
    suffixes: tuple[str, ...]  # "*.get" -> ".get"
    any_role: bool
    roles: frozenset[str]
    derived_roles: tuple[str, ...]  # `*` expanded to every declared derived role
    condition: _Condition | None

    def matches_action(self, action: str) -> bool:
        return (
            self.any_action
            or action in self.exact_actions
            or action.startswith(self.prefixes)
            or action.endswith(self.suffixes)
        )


def _compile_rule(
    rule: Rule, condition: _Condition | None, derived_names: Sequence[str]
) -> _CompiledRule:
    patterns = rule.actions
    derived = (
        tuple(derived_names)
        if WILDCARD in rule.derived_roles
        else tuple(name for name in derived_names if name in rule.derived_roles)
    )
    return _CompiledRule(
        rule=rule,
        any_action=WILDCARD in patterns,
        exact_actions=frozenset(p for p in patterns if "*" not in p),
        prefixes=tuple(p[:-1] for p in patterns if p != WILDCARD and p.endswith(".*")),
        suffixes=tuple(p[1:] for p in patterns if p != WILDCARD and p.startswith("*.")),
        any_role=WILDCARD in rule.roles,
        roles=rule.roles,
        derived_roles=derived,
        condition=condition,
    )


# --- evaluation ------------------------------------------------------------------------------


_NOT_APPLICABLE: Final = 0
_APPLIES: Final = 1
_FAILED: Final = 2


class _Evaluation:
    """The state of one decision: the CEL context is built lazily, once, and only with the
    variables the evaluated conditions read; derived roles are resolved at most once."""

    __slots__ = ("_added", "_context", "_derived", "bundle", "request", "trace")

    def __init__(self, bundle: CompiledBundle, request: Request, explain: bool) -> None:
        self.bundle = bundle
        self.request = request
        self.trace: list[TraceStep] | None = [] if explain else None
        self._context: cel.Context | None = None
        self._added: dict[str, frozenset[str] | None] = {}
        self._derived: dict[str, Outcome] = {}

    def run(self) -> Decision:
        kind = self.request.resource.kind
        rules = self.bundle._policies.get(kind)
        trace = self.trace
        if rules is None:
            if trace is not None:
                trace.append(TraceStep(StepKind.POLICY, kind, detail="no resource policy"))
            return self._decision(Effect.DENY, Reason.NO_MATCHING_RULE, None)
        if trace is not None:
            trace.append(TraceStep(StepKind.POLICY, kind))
        # The first applying rule of each outcome, in document order.
        deny: Rule | None = None
        error: Rule | None = None
        approval: Rule | None = None
        allow: Rule | None = None
        for compiled in rules:
            outcome = self._rule(compiled)
            if outcome is _NOT_APPLICABLE:
                continue
            if outcome is _APPLIES:
                effect = compiled.rule.effect
                if effect is Effect.DENY:
                    deny = deny or compiled.rule
                    if trace is None:
                        break  # deny overrides: nothing after it can change the answer
                elif effect is Effect.REQUIRE_APPROVAL:
                    approval = approval or compiled.rule
                else:
                    allow = allow or compiled.rule
            else:
                error = error or compiled.rule
        return self._combine(deny, error, approval, allow)

    def _combine(
        self, deny: Rule | None, error: Rule | None, approval: Rule | None, allow: Rule | None
    ) -> Decision:
        """Deny overrides; then fail closed; then REQUIRE_APPROVAL over ALLOW; else deny."""
        if deny is not None:
            return self._decision(Effect.DENY, Reason.DENIED_BY_RULE, deny)
        if error is not None:
            return self._decision(Effect.DENY, Reason.CONDITION_ERROR, error)
        if approval is not None:
            return self._decision(Effect.REQUIRE_APPROVAL, Reason.APPROVAL_REQUIRED, approval)
        if allow is not None:
            return self._decision(Effect.ALLOW, Reason.ALLOWED, allow)
        return self._decision(Effect.DENY, Reason.NO_MATCHING_RULE, None)

    def _rule(self, compiled: _CompiledRule) -> int:
        """_APPLIES, _NOT_APPLICABLE, or _FAILED when a condition it needs failed to evaluate."""
        trace = self.trace
        rule = compiled.rule
        if not compiled.matches_action(self.request.action):
            if trace is not None:
                trace.append(TraceStep(StepKind.RULE, rule.name, False, effect=rule.effect))
            return _NOT_APPLICABLE
        roles = self._principal_holds(compiled)
        condition, detail = Outcome.NOT_EVALUATED, ""
        if roles is Outcome.TRUE:
            if compiled.condition is None:
                condition = Outcome.NO_CONDITION
            else:
                condition, detail = self._condition(compiled.condition)
        elif roles is Outcome.ERROR:
            detail = "a derived role's condition could not be evaluated"
        if trace is not None:
            trace.append(
                TraceStep(StepKind.RULE, rule.name, True, roles, condition, rule.effect, detail)
            )
        if roles is Outcome.ERROR or condition is Outcome.ERROR:
            return _FAILED
        if condition is Outcome.TRUE or condition is Outcome.NO_CONDITION:
            return _APPLIES
        return _NOT_APPLICABLE

    def _decision(self, effect: Effect, reason: Reason, rule: Rule | None) -> Decision:
        approvers: tuple[str, ...] = ()
        ttl: int | None = None
        if rule is not None and effect is Effect.REQUIRE_APPROVAL:
            approvers, ttl = rule.approver_roles, rule.approval_ttl_seconds
        return Decision(
            effect=effect,
            reason=reason,
            bundle_version=self.bundle.bundle.content_hash,
            principal_id=self.request.principal.id,
            rule=rule.name if rule is not None else None,
            approver_roles=approvers,
            approval_ttl_seconds=ttl,
            trace=tuple(self.trace) if self.trace is not None else None,
        )

    def _principal_holds(self, compiled: _CompiledRule) -> Outcome:
        """Roles OR derived roles, with CEL's `||` semantics: TRUE absorbs ERROR."""
        if compiled.any_role or not compiled.roles.isdisjoint(self.request.principal.roles):
            return Outcome.TRUE
        failed = False
        for name in compiled.derived_roles:
            outcome = self._derived_role(name)
            if outcome is Outcome.TRUE:
                return Outcome.TRUE
            failed = failed or outcome is Outcome.ERROR
        return Outcome.ERROR if failed else Outcome.FALSE

    def _derived_role(self, name: str) -> Outcome:
        known = self._derived.get(name)
        if known is not None:
            return known
        compiled = self.bundle._derived[name]
        parent = compiled.any_parent or not compiled.role.parent_roles.isdisjoint(
            self.request.principal.roles
        )
        condition, detail = Outcome.NOT_EVALUATED, ""
        if not parent:
            outcome = Outcome.FALSE
        elif compiled.condition is None:
            outcome, condition = Outcome.TRUE, Outcome.NO_CONDITION
        else:
            condition, detail = self._condition(compiled.condition)
            outcome = condition
        self._derived[name] = outcome
        if self.trace is not None:
            roles = Outcome.TRUE if parent else Outcome.FALSE
            self.trace.append(
                TraceStep(StepKind.DERIVED_ROLE, name, None, roles, condition, detail=detail)
            )
        return outcome

    def _condition(self, condition: _Condition) -> tuple[Outcome, str]:
        try:
            context = self._context
            if context is None:
                context = self._context = cel.Context()
            added = self._added
            for name, fields in condition.variables:
                have = added.get(name, _NO_FIELDS)
                if have is None or (fields is not None and fields <= have):
                    continue
                want = None if fields is None else have | fields
                context.add_variable(name, _variable(name, want, self.request))
                added[name] = want
            result = condition.program.execute(context)
        except Exception as exc:  # fail closed: any evaluation failure is an ERROR outcome
            return Outcome.ERROR, f"{type(exc).__name__}: {exc}"
        if result is True:
            return Outcome.TRUE, ""
        if result is False:
            return Outcome.FALSE, ""
        return Outcome.ERROR, f"the condition returned {type(result).__name__}, not bool"


# Converting Python values into CEL costs about a microsecond per value, so a decision converts
# only the variables, and the fields of them, that the conditions it evaluates read.
_NO_FIELDS: Final[frozenset[str]] = frozenset()


def _attr(value: Mapping[str, object]) -> object:
    return value if type(value) is dict else dict(value)


_FIELDS: dict[str, dict[str, Callable[[Request], object]]] = {
    "principal": {
        "id": lambda r: r.principal.id,
        "type": lambda r: r.principal.type,
        "tenant": lambda r: r.principal.tenant,
        "roles": lambda r: sorted(r.principal.roles),
        "attr": lambda r: _attr(r.principal.attr),
        "chain": lambda r: list(r.principal.chain),
    },
    "resource": {
        "kind": lambda r: r.resource.kind,
        "id": lambda r: r.resource.id,
        "attr": lambda r: _attr(r.resource.attr),
    },
    "request": {
        "action": lambda r: r.action,
        "context": lambda r: _attr(r.context),
    },
    "session": {
        "id": lambda r: r.session.id,
        "labels": lambda r: sorted(r.session.labels),
        "attr": lambda r: _attr(r.session.attr),
    },
}


def _variable(name: str, fields: frozenset[str] | None, request: Request) -> dict[str, object]:
    builders = _FIELDS[name]
    if fields is None:
        return {field: build(request) for field, build in builders.items()}
    return {field: builders[field](request) for field in fields if field in builders}


def _fields_read(source: str, variable: str) -> frozenset[str] | None:
    """The fields of `variable` an expression reads, when every mention of it is a plain
    `variable.field`; None (all fields) for any other use. Over-approximates: a mention inside
    a string literal or comment only adds fields, it never hides one."""
    fields: set[str] = set()
    mentions = re.finditer(rf"(?<![\w.]){variable}(?!\w)(\s*\.\s*([A-Za-z_]\w*))?", source)
    for mention in mentions:
        if mention.group(2) is None:
            return None
        fields.add(mention.group(2))
    return frozenset(fields) or None


def _principal_steps(principal: Principal, decision: Decision) -> list[TraceStep]:
    return [
        TraceStep(StepKind.PRINCIPAL, principal.id),
        *(decision.trace or ()),
        TraceStep(
            StepKind.RESULT,
            principal.id,
            effect=decision.effect,
            detail=_summary(decision),
        ),
    ]


def _summary(decision: Decision) -> str:
    """`DENY (DENIED_BY_RULE, rule r)`: an effect with its reason and rule."""
    rule = f", rule {decision.rule}" if decision.rule else ""
    return f"{decision.effect.value} ({decision.reason.value}{rule})"


def _run_test(bundle: CompiledBundle, index: int, test: BundleTest) -> CaseResult:
    if test.delegates:
        decision = decide_chain(bundle, test.request, test.delegates)
    else:
        decision = decide(bundle, test.request)
    expect = test.expect
    got = _summary(decision)
    message = ""
    if decision.effect is not expect.effect:
        message = f"expected {expect.effect.value}, got {got}"
    elif expect.reason is not None and decision.reason is not expect.reason:
        message = f"expected reason {expect.reason.value}, got {got}"
    elif expect.rule is not None and decision.rule != expect.rule:
        message = f"expected rule {expect.rule}, got {got}"
    return CaseResult(index, test.name, not message, decision, message)


# --- parsing ---------------------------------------------------------------------------------


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument.fields(FieldViolation(field, description))


def _message(violations: Sequence[FieldViolation]) -> str:
    shown = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
    more = len(violations) - 5
    return f"invalid policy bundle: {shown}" + (f" (and {more} more)" if more > 0 else "")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _load_json(text: str) -> Any:
    try:
        return json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise _invalid(DOCUMENT, f"not valid JSON: {exc}") from None


class _Loader(yaml.SafeLoader):
    """Safe YAML restricted to JSON's data model."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases are not allowed", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        mapping: dict[Hashable, Any] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be strings", key_node.start_mark
                )
            if key in mapping:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


# JSON's scalars only: YAML 1.1's timestamps, yes/no/on/off, octal, sexagesimal and .inf/.nan
# stay strings, so a YAML document and its JSON spelling parse (and hash) the same.
_NUMBER_START = list("-0123456789")
_Loader.yaml_implicit_resolvers = {}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^-?(?:0|[1-9][0-9]*)$"), _NUMBER_START
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?|[eE][-+]?[0-9]+)$"),
    _NUMBER_START,
)


def _load_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise _invalid(DOCUMENT, f"not valid YAML{where}: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise _invalid(DOCUMENT, f"not valid YAML: {exc}") from None


# --- validation ------------------------------------------------------------------------------


_BUNDLE_KEYS = frozenset(
    {"version", "description", "derived_roles", "resource_policies", "quotas", "tests"}
)
_QUOTA_KEYS = frozenset(
    {"name", "resource", "actions", "limit", "window_seconds", "per", "condition", "description"}
)
_SCOPES = {scope.value: scope for scope in QuotaScope}
MAX_QUOTA_WINDOW_SECONDS: Final = 366 * 86400
MAX_QUOTA_LIMIT: Final = 10**15
_DERIVED_KEYS = frozenset({"parent_roles", "condition", "description"})
_POLICY_KEYS = frozenset({"resource", "rules", "description"})
_RULE_KEYS = frozenset(
    {
        "name",
        "actions",
        "effect",
        "roles",
        "derived_roles",
        "condition",
        "approver_roles",
        "approval_ttl_seconds",
        "description",
    }
)
_TEST_KEYS = frozenset(
    {"name", "principal", "resource", "action", "session", "context", "delegates", "expect"}
)
_PRINCIPAL_KEYS = frozenset({"id", "roles", "attr", "tenant", "type", "chain"})
_RESOURCE_KEYS = frozenset({"kind", "id", "attr"})
_SESSION_KEYS = frozenset({"id", "labels", "attr"})
_EXPECT_KEYS = frozenset({"effect", "reason", "rule"})
_EFFECTS = {effect.value: effect for effect in Effect}
_REASONS = {reason.value: reason for reason in Reason}


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


class _Checker:
    """Walks a document, collecting every violation rather than stopping at the first."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def fail(self, path: str, description: str) -> None:
        self.violations.append(FieldViolation(path or DOCUMENT, description))

    # generic shapes

    def mapping(
        self, value: object, path: str, allowed: frozenset[str], required: Sequence[str] = ()
    ) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping, got {_type_name(value)}")
            return None
        for key in value:
            if key not in allowed:
                self.fail(_at(path, str(key)), "unknown field")
        for key in required:
            if key not in value:
                self.fail(_at(path, key), "required")
        return value

    def string(self, value: object, path: str, *, name: bool = False) -> str | None:
        if not isinstance(value, str):
            self.fail(path, f"must be a string, got {_type_name(value)}")
            return None
        if name and not _NAME.fullmatch(value):
            self.fail(path, f"{value!r} is not a valid name (letters, digits, _ . : / -)")
            return None
        return value

    def optional_string(self, doc: dict[str, Any], key: str, path: str) -> str | None:
        return self.string(doc[key], _at(path, key)) if key in doc else None

    def strings(
        self, value: object, path: str, *, nonempty: bool = True, name: bool = False
    ) -> tuple[str, ...] | None:
        if not isinstance(value, list):
            self.fail(path, f"must be a list of strings, got {_type_name(value)}")
            return None
        if nonempty and not value:
            self.fail(path, "must not be empty")
            return None
        items = [self.string(item, f"{path}[{i}]", name=name) for i, item in enumerate(value)]
        if any(item is None for item in items):
            return None
        return tuple(item for item in items if item is not None)

    def attrs(self, value: object, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping, got {_type_name(value)}")
            return {}
        return value

    def roles(self, value: object, path: str) -> frozenset[str] | None:
        items = self.strings(value, path, nonempty=False)
        if items is None:
            return None
        for i, item in enumerate(items):
            if item != WILDCARD and not _NAME.fullmatch(item):
                self.fail(f"{path}[{i}]", f"{item!r} is not a valid role name")
        return frozenset(items)

    def condition(self, value: object, path: str) -> _Condition | None:
        source = self.string(value, path)
        if source is None:
            return None
        try:
            program = cel.compile(source)
        except Exception as exc:  # the CEL compiler reports syntax errors as ValueError
            self.fail(path, f"CEL: {_compile_error(exc)}")
            return None
        names = program.variables()
        unknown = [
            n
            for n in names
            if n not in VARIABLES and not re.search(_MACRO_BINDING.format(re.escape(n)), source)
        ]
        for n in unknown:
            self.fail(path, f"CEL: unknown variable {n!r} (use {', '.join(VARIABLES)})")
        if unknown:
            return None
        used = tuple((v, _fields_read(source, v)) for v in VARIABLES if v in names)
        return _Condition(source, program, used)

    # the bundle

    def bundle(
        self, document: object, digest: str
    ) -> tuple[
        PolicyBundle,
        dict[str, tuple[_CompiledRule, ...]],
        dict[str, _CompiledDerivedRole],
        tuple[_CompiledQuota, ...],
    ]:
        doc = self.mapping(document, "", _BUNDLE_KEYS) or {}
        version = self.optional_string(doc, "version", "") or ""
        self.optional_string(doc, "description", "")
        derived = self.derived_roles(doc.get("derived_roles", {}), "derived_roles")
        derived_names = list(derived)
        policies: list[ResourcePolicy] = []
        compiled: dict[str, tuple[_CompiledRule, ...]] = {}
        raw_policies = doc.get("resource_policies", [])
        if not isinstance(raw_policies, list):
            self.fail("resource_policies", f"must be a list, got {_type_name(raw_policies)}")
            raw_policies = []
        for i, raw in enumerate(raw_policies):
            path = f"resource_policies[{i}]"
            result = self.policy(raw, path, derived_names)
            if result is None:
                continue
            policy, rules = result
            if policy.resource in compiled:
                self.fail(_at(path, "resource"), f"duplicate policy for {policy.resource!r}")
                continue
            policies.append(policy)
            compiled[policy.resource] = rules
        quotas = self.quotas(doc.get("quotas", []), "quotas")
        tests = self.tests(doc.get("tests", []), "tests")
        bundle = PolicyBundle(
            version=version,
            content_hash=digest,
            derived_roles={name: d.role for name, d in derived.items()},
            resource_policies=tuple(policies),
            tests=tests,
            quotas=tuple(q.quota for q in quotas),
        )
        return bundle, compiled, derived, quotas

    # quotas

    def quotas(self, value: object, path: str) -> tuple[_CompiledQuota, ...]:
        if not isinstance(value, list):
            self.fail(path, f"must be a list of quotas, got {_type_name(value)}")
            return ()
        out: list[_CompiledQuota] = []
        names: set[str] = set()
        for i, raw in enumerate(value):
            here = f"{path}[{i}]"
            quota = self.quota(raw, here)
            if quota is None:
                continue
            if quota.quota.name in names:
                self.fail(_at(here, "name"), f"duplicate quota name {quota.quota.name!r}")
            names.add(quota.quota.name)
            out.append(quota)
        return tuple(out)

    def quota(self, value: object, path: str) -> _CompiledQuota | None:
        required = ("name", "resource", "actions", "limit", "window_seconds", "per")
        doc = self.mapping(value, path, _QUOTA_KEYS, required)
        if doc is None:
            return None
        self.optional_string(doc, "description", path)
        name = self.string(doc["name"], _at(path, "name"), name=True) if "name" in doc else None
        kind = (
            self.string(doc["resource"], _at(path, "resource"), name=True)
            if "resource" in doc
            else None
        )
        actions = self.actions(doc["actions"], _at(path, "actions")) if "actions" in doc else None
        limit = self.integer(doc, "limit", path, 1, MAX_QUOTA_LIMIT)
        window = self.integer(doc, "window_seconds", path, 1, MAX_QUOTA_WINDOW_SECONDS)
        per = _SCOPES.get(doc["per"]) if isinstance(doc.get("per"), str) else None
        if per is None and "per" in doc:
            self.fail(_at(path, "per"), f"must be one of {', '.join(_SCOPES)}")
        condition = None
        if "condition" in doc:
            condition = self.condition(doc["condition"], _at(path, "condition"))
            if condition is None:
                return None
        if None in (name, kind, actions, limit, window, per):
            return None
        assert name and kind and actions and limit and window and per
        quota = Quota(
            name, kind, actions, limit, window, per, condition.source if condition else None
        )
        return _compile_quota(quota, condition)

    def integer(self, doc: dict[str, Any], key: str, path: str, low: int, high: int) -> int | None:
        if key not in doc:
            return None
        value = doc[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(_at(path, key), "must be an integer")
            return None
        if not low <= value <= high:
            self.fail(_at(path, key), f"must be in {low}..{high}")
            return None
        return value

    def derived_roles(self, value: object, path: str) -> dict[str, _CompiledDerivedRole]:
        out: dict[str, _CompiledDerivedRole] = {}
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping of name to derived role, got {_type_name(value)}")
            return out
        for name, raw in value.items():
            here = _at(path, name)
            if name == WILDCARD or not _NAME.fullmatch(name):
                self.fail(here, f"{name!r} is not a valid derived role name")
            doc = self.mapping(raw, here, _DERIVED_KEYS, ("parent_roles",))
            if doc is None:
                continue
            self.optional_string(doc, "description", here)
            parents = (
                self.roles(doc["parent_roles"], _at(here, "parent_roles"))
                if "parent_roles" in doc
                else None
            )
            if parents is not None and not parents:
                self.fail(_at(here, "parent_roles"), "must not be empty")
            condition = (
                self.condition(doc["condition"], _at(here, "condition"))
                if "condition" in doc
                else None
            )
            if parents:
                role = DerivedRole(name, parents, condition.source if condition else None)
                out[name] = _CompiledDerivedRole(role, WILDCARD in parents, condition)
        return out

    def policy(
        self, value: object, path: str, derived_names: Sequence[str]
    ) -> tuple[ResourcePolicy, tuple[_CompiledRule, ...]] | None:
        doc = self.mapping(value, path, _POLICY_KEYS, ("resource", "rules"))
        if doc is None:
            return None
        self.optional_string(doc, "description", path)
        resource = (
            self.string(doc["resource"], _at(path, "resource"), name=True)
            if "resource" in doc
            else None
        )
        raw_rules = doc.get("rules", [])
        if not isinstance(raw_rules, list) or not raw_rules:
            if "rules" in doc:
                self.fail(_at(path, "rules"), "must be a non-empty list of rules")
            return None
        rules: list[_CompiledRule] = []
        names: set[str] = set()
        for j, raw in enumerate(raw_rules):
            here = f"{path}.rules[{j}]"
            rule = self.rule(raw, here, derived_names)
            if rule is None:
                continue
            if rule.rule.name in names:
                self.fail(_at(here, "name"), f"duplicate rule name {rule.rule.name!r}")
            names.add(rule.rule.name)
            rules.append(rule)
        if resource is None:
            return None
        return ResourcePolicy(resource, tuple(r.rule for r in rules)), tuple(rules)

    def rule(self, value: object, path: str, derived_names: Sequence[str]) -> _CompiledRule | None:
        doc = self.mapping(value, path, _RULE_KEYS, ("name", "actions", "effect"))
        if doc is None:
            return None
        ok = True
        self.optional_string(doc, "description", path)
        name = self.string(doc["name"], _at(path, "name"), name=True) if "name" in doc else None
        actions = self.actions(doc["actions"], _at(path, "actions")) if "actions" in doc else None
        effect: Effect | None = None
        if "effect" in doc:
            raw_effect = doc["effect"]
            effect = _EFFECTS.get(raw_effect) if isinstance(raw_effect, str) else None
            if effect is None:
                self.fail(
                    _at(path, "effect"),
                    f"unknown effect {raw_effect!r} (one of {', '.join(_EFFECTS)})",
                )
        roles = self.roles(doc.get("roles", []), _at(path, "roles"))
        derived = self.roles(doc.get("derived_roles", []), _at(path, "derived_roles"))
        if roles is not None and derived is not None and not roles and not derived:
            self.fail(path, "needs roles or derived_roles (use ['*'] for any principal)")
            ok = False
        if derived:
            for k, ref in enumerate(doc["derived_roles"]):
                if ref != WILDCARD and ref not in derived_names:
                    self.fail(f"{path}.derived_roles[{k}]", f"unknown derived role {ref!r}")
                    ok = False
        condition = None
        if "condition" in doc:
            condition = self.condition(doc["condition"], _at(path, "condition"))
            ok = ok and condition is not None
        approvers, ttl = self.approval(doc, path, effect)
        if (
            not ok
            or name is None
            or actions is None
            or effect is None
            or roles is None
            or derived is None
        ):
            return None
        rule = Rule(
            name=name,
            actions=actions,
            effect=effect,
            roles=roles,
            derived_roles=derived,
            condition=condition.source if condition else None,
            approver_roles=approvers,
            approval_ttl_seconds=ttl,
        )
        return _compile_rule(rule, condition, derived_names)

    def actions(self, value: object, path: str) -> tuple[str, ...] | None:
        items = self.strings(value, path)
        if items is None:
            return None
        for i, item in enumerate(items):
            if not _valid_action_pattern(item):
                self.fail(
                    f"{path}[{i}]",
                    f"{item!r} is not an action pattern (exact, '*', 'prefix.*' or '*.suffix')",
                )
                return None
        return items

    def approval(
        self, doc: dict[str, Any], path: str, effect: Effect | None
    ) -> tuple[tuple[str, ...], int | None]:
        if effect is not Effect.REQUIRE_APPROVAL:
            for key in ("approver_roles", "approval_ttl_seconds"):
                if key in doc and effect is not None:
                    self.fail(_at(path, key), "only valid with effect REQUIRE_APPROVAL")
            return (), None
        approvers: tuple[str, ...] = ()
        if "approver_roles" not in doc:
            self.fail(_at(path, "approver_roles"), "required when effect is REQUIRE_APPROVAL")
        else:
            roles = self.roles(doc["approver_roles"], _at(path, "approver_roles"))
            if roles is not None and (not roles or WILDCARD in roles):
                self.fail(_at(path, "approver_roles"), "must name at least one role, not '*'")
            approvers = tuple(dict.fromkeys(doc["approver_roles"])) if roles else ()
        ttl = doc.get("approval_ttl_seconds", DEFAULT_APPROVAL_TTL_SECONDS)
        if isinstance(ttl, bool) or not isinstance(ttl, int):
            self.fail(_at(path, "approval_ttl_seconds"), "must be an integer")
            ttl = None
        elif not 0 < ttl <= MAX_APPROVAL_TTL_SECONDS:
            self.fail(
                _at(path, "approval_ttl_seconds"), f"must be in 1..{MAX_APPROVAL_TTL_SECONDS}"
            )
            ttl = None
        return approvers, ttl

    # embedded tests

    def tests(self, value: object, path: str) -> tuple[BundleTest, ...]:
        if not isinstance(value, list):
            self.fail(path, f"must be a list of tests, got {_type_name(value)}")
            return ()
        out: list[BundleTest] = []
        for i, raw in enumerate(value):
            test = self.test(raw, f"{path}[{i}]", i)
            if test is not None:
                out.append(test)
        return tuple(out)

    def test(self, value: object, path: str, index: int) -> BundleTest | None:
        doc = self.mapping(value, path, _TEST_KEYS, ("principal", "resource", "action", "expect"))
        if doc is None:
            return None
        name = self.optional_string(doc, "name", path) or f"tests[{index}]"
        principal = (
            self.principal(doc["principal"], _at(path, "principal")) if "principal" in doc else None
        )
        resource = (
            self.resource(doc["resource"], _at(path, "resource")) if "resource" in doc else None
        )
        action = self.optional_string(doc, "action", path)
        session = self.session(doc["session"], _at(path, "session")) if "session" in doc else None
        context = self.attrs(doc.get("context", {}), _at(path, "context"))
        delegates: list[Principal | None] = []
        raw_delegates = doc.get("delegates", [])
        if isinstance(raw_delegates, list):
            delegates = [
                self.principal(d, f"{path}.delegates[{k}]") for k, d in enumerate(raw_delegates)
            ]
        else:
            self.fail(_at(path, "delegates"), "must be a list of principals")
        expect = self.expect(doc["expect"], _at(path, "expect")) if "expect" in doc else None
        if principal is None or resource is None or action is None or expect is None:
            return None
        if any(d is None for d in delegates):
            return None
        request = Request(principal, resource, action, session or Session(), context)
        return BundleTest(name, request, expect, tuple(d for d in delegates if d is not None))

    def principal(self, value: object, path: str) -> Principal | None:
        doc = self.mapping(value, path, _PRINCIPAL_KEYS, ("id",))
        if doc is None or "id" not in doc:
            return None
        pid = self.string(doc["id"], _at(path, "id"))
        roles = self.strings(doc.get("roles", []), _at(path, "roles"), nonempty=False)
        chain = self.strings(doc.get("chain", []), _at(path, "chain"), nonempty=False)
        attr = self.attrs(doc.get("attr", {}), _at(path, "attr"))
        tenant = self.optional_string(doc, "tenant", path) or ""
        kind = self.optional_string(doc, "type", path) or ""
        if pid is None or roles is None or chain is None:
            return None
        return Principal(pid, frozenset(roles), attr, tenant, kind, chain)

    def resource(self, value: object, path: str) -> Resource | None:
        doc = self.mapping(value, path, _RESOURCE_KEYS, ("kind",))
        if doc is None or "kind" not in doc:
            return None
        kind = self.string(doc["kind"], _at(path, "kind"))
        rid = self.optional_string(doc, "id", path) or ""
        attr = self.attrs(doc.get("attr", {}), _at(path, "attr"))
        return Resource(kind, rid, attr) if kind is not None else None

    def session(self, value: object, path: str) -> Session | None:
        doc = self.mapping(value, path, _SESSION_KEYS)
        if doc is None:
            return None
        sid = self.optional_string(doc, "id", path) or ""
        labels = self.strings(doc.get("labels", []), _at(path, "labels"), nonempty=False)
        attr = self.attrs(doc.get("attr", {}), _at(path, "attr"))
        return Session(sid, frozenset(labels or ()), attr)

    def expect(self, value: object, path: str) -> Expectation | None:
        doc = self.mapping(value, path, _EXPECT_KEYS, ("effect",))
        if doc is None:
            return None
        effect = _EFFECTS.get(doc["effect"]) if isinstance(doc.get("effect"), str) else None
        if effect is None and "effect" in doc:
            self.fail(_at(path, "effect"), f"unknown effect {doc['effect']!r}")
        reason = None
        if "reason" in doc:
            reason = _REASONS.get(doc["reason"]) if isinstance(doc["reason"], str) else None
            if reason is None:
                self.fail(_at(path, "reason"), f"unknown reason {doc['reason']!r}")
        rule = self.optional_string(doc, "rule", path)
        return Expectation(effect, reason, rule) if effect is not None else None


def _valid_action_pattern(pattern: str) -> bool:
    if pattern == WILDCARD:
        return True
    if pattern.startswith("*."):
        pattern = pattern[2:]
    elif pattern.endswith(".*"):
        pattern = pattern[:-2]
    return bool(pattern) and "*" not in pattern and not pattern.isspace()


def _compile_error(exc: Exception) -> str:
    text = str(exc)
    marker = text.find("ERROR: ")
    if marker >= 0:
        text = text[marker + len("ERROR: ") :]
    return text.splitlines()[0] if text else type(exc).__name__


# --- the platform bundle ---------------------------------------------------------------------


def _platform_document() -> dict[str, Any]:
    def rule(name: str, actions: list[str], roles: list[str]) -> dict[str, Any]:
        return {"name": name, "actions": actions, "roles": roles, "effect": "ALLOW"}

    def test(role: str, action: str, effect: str) -> dict[str, Any]:
        return {
            "name": f"{role} {action}",
            "principal": {"id": f"test-{role}", "roles": [role]},
            "resource": {"kind": "trustplane.method"},
            "action": action,
            "expect": {"effect": effect},
        }

    return {
        "version": "platform-1",
        "description": "Built-in tenant roles over the suite's own RPC permissions.",
        "resource_policies": [
            {
                "resource": "trustplane.method",
                # One rule per tenant role, straight from the built-in table, so the two
                # can never disagree.
                "rules": [rule(role, list(grants), [role]) for role, grants in ROLE_GRANTS.items()],
            }
        ],
        "tests": [
            test("viewer", "sessions.get", "ALLOW"),
            test("viewer", "sessions.create", "DENY"),
            test("member", "crypto.keys.use", "ALLOW"),
            test("member", "crypto.keys.rotate", "DENY"),
            test("admin", "policy.explain", "ALLOW"),
            test("admin", "tenants.transfer", "DENY"),
            test("owner", "tenants.transfer", "ALLOW"),
        ],
    }


@cache
def _platform_bundle() -> CompiledBundle:
    return compile_bundle(_platform_document())
