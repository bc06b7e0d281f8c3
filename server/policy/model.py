"""The policy model: what a bundle says, what a decision is asked about, and what it answers.

These frozen dataclasses are the contract the Policy service exposes. A bundle is parsed and
compiled by `server.policy.engine`; requests and decisions are plain values with no reference to
CEL, gRPC or storage. Attribute maps hold JSON-like values (str, int, float, bool, None, lists and
maps of those, and `datetime` for timestamps); the engine never mutates them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

WILDCARD = "*"


class Effect(enum.Enum):
    """What a rule (or a decision) says. Ordered by restrictiveness: DENY > REQUIRE_APPROVAL >
    ALLOW."""

    ALLOW = "ALLOW"
    DENY = "DENY"
    REQUIRE_APPROVAL = "REQUIRE_APPROVAL"

    @property
    def severity(self) -> int:
        """Higher is more restrictive; the combining order of deny-overrides."""
        return _SEVERITY[self]


_SEVERITY = {Effect.ALLOW: 0, Effect.REQUIRE_APPROVAL: 1, Effect.DENY: 2}


class Reason(enum.Enum):
    """A caller-safe reason code for a decision: names the cause, never internal detail."""

    ALLOWED = "ALLOWED"
    """An ALLOW rule matched and nothing more restrictive did."""
    APPROVAL_REQUIRED = "APPROVAL_REQUIRED"
    """A REQUIRE_APPROVAL rule matched and no DENY did; see the approver roles and TTL."""
    DENIED_BY_RULE = "DENIED_BY_RULE"
    """A DENY rule matched."""
    NO_MATCHING_RULE = "NO_MATCHING_RULE"
    """Default deny: no rule of the resource kind's policy matched (or there is no policy)."""
    CONDITION_ERROR = "CONDITION_ERROR"
    """Fail closed: a condition (of a rule or of a derived role it needed) could not be
    evaluated (a missing attribute, a type error, a non-boolean result)."""
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    """The rules allowed it but a quota that applies is spent (set by the Policy service)."""
    APPROVED = "APPROVED"
    """REQUIRE_APPROVAL, turned into ALLOW once by a redeemed approval token."""
    APPROVAL_INVALID = "APPROVAL_INVALID"
    """An approval token was presented and refused (unknown, used, expired, another call)."""
    APPROVAL_UNAVAILABLE = "APPROVAL_UNAVAILABLE"
    """An approval token was presented but no approval service is configured: fail closed."""
    SESSION_ENDED = "SESSION_ENDED"
    """The stored agent session the call runs in has ended: nothing is allowed in it."""
    SCOPE_MISSING = "SCOPE_MISSING"
    """A suite method (kind `trustplane.method`) the caller's roles allow but its credential's
    scopes do not include (set by the Policy service, as the authorize layer decides it)."""

    @property
    def from_rules(self) -> bool:
        """Whether the engine gives this reason (the others come from quotas and approvals)."""
        return self not in _SERVICE_REASONS


_SERVICE_REASONS = frozenset(
    {
        Reason.SCOPE_MISSING,
        Reason.QUOTA_EXCEEDED,
        Reason.APPROVED,
        Reason.APPROVAL_INVALID,
        Reason.APPROVAL_UNAVAILABLE,
        Reason.SESSION_ENDED,
    }
)


class Outcome(enum.Enum):
    """How a condition (or a role check) came out, in an explain trace."""

    TRUE = "TRUE"
    FALSE = "FALSE"
    ERROR = "ERROR"
    NO_CONDITION = "NO_CONDITION"
    NOT_EVALUATED = "NOT_EVALUATED"


class StepKind(enum.Enum):
    PRINCIPAL = "PRINCIPAL"
    """Starts the steps for one principal of a delegation chain."""
    POLICY = "POLICY"
    """The resource policy looked up (or its absence)."""
    DERIVED_ROLE = "DERIVED_ROLE"
    RULE = "RULE"
    RESULT = "RESULT"


class QuotaScope(enum.Enum):
    """What a quota counts per."""

    TENANT = "tenant"
    PRINCIPAL = "principal"
    AGENT = "agent"
    """The acting agent: the current actor of a delegation chain, else the principal."""
    SESSION = "session"
    """The agent session; calls outside any session share one counter."""


# --- the bundle ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DerivedRole:
    """A role granted to principals holding one of `parent_roles` (`*`: any principal) while
    `condition` (CEL, optional) holds."""

    name: str
    parent_roles: frozenset[str]
    condition: str | None = None


@dataclass(frozen=True)
class Rule:
    """One rule of a resource policy.

    It applies when the action matches one of `actions` (exact, `*`, `prefix.*` or `*.suffix`),
    the principal holds one of `roles` or one of `derived_roles` (`*`: any), and `condition`
    (CEL, optional) is true.
    """

    name: str
    actions: tuple[str, ...]
    effect: Effect
    roles: frozenset[str] = frozenset()
    derived_roles: frozenset[str] = frozenset()
    condition: str | None = None
    approver_roles: tuple[str, ...] = ()
    approval_ttl_seconds: int | None = None


@dataclass(frozen=True)
class ResourcePolicy:
    """The rules for one resource kind (`tool`, `data`, `crypto.key`, `trustplane.method`)."""

    resource: str
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Quota:
    """ "At most `limit` units of `actions` on `resource` per `window_seconds` per `per`",
    applied to decisions the rules allow and, when set, for which `condition` holds. Windows
    are fixed, aligned to the Unix epoch."""

    name: str
    resource: str
    actions: tuple[str, ...]
    limit: int
    window_seconds: int
    per: QuotaScope
    condition: str | None = None


@dataclass(frozen=True)
class Expectation:
    effect: Effect
    reason: Reason | None = None
    rule: str | None = None


@dataclass(frozen=True)
class BundleTest:
    """A test case embedded in a bundle: the bundle is rejected unless it passes."""

    name: str
    request: Request
    expect: Expectation
    delegates: tuple[Principal, ...] = ()


@dataclass(frozen=True)
class PolicyBundle:
    """A validated bundle document. `content_hash` (SHA-256 of the canonical JSON of the parsed
    document) is its immutable version id; `version` is the author's free-text label."""

    version: str
    content_hash: str
    derived_roles: Mapping[str, DerivedRole] = field(default_factory=dict, hash=False)
    resource_policies: tuple[ResourcePolicy, ...] = ()
    tests: tuple[BundleTest, ...] = ()
    quotas: tuple[Quota, ...] = ()


# --- a decision request ----------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """Who asks. In CEL: `principal.{id, type, tenant, roles, attr, chain}`; `chain` is the ids of
    the delegation chain (RFC 8693 `act`, current actor first)."""

    id: str
    roles: frozenset[str] = frozenset()
    attr: Mapping[str, object] = field(default_factory=dict, hash=False)
    tenant: str = ""
    type: str = ""
    chain: tuple[str, ...] = ()


@dataclass(frozen=True)
class Resource:
    """What is acted on. In CEL: `resource.{kind, id, attr}`."""

    kind: str
    id: str = ""
    attr: Mapping[str, object] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Session:
    """The agent session the call runs in. In CEL: `session.{id, labels, attr}`. A call outside
    any session gets the empty session (no labels). `ended`: a stored session that has ended
    (the Policy service denies everything in it; not visible to CEL)."""

    id: str = ""
    labels: frozenset[str] = frozenset()
    attr: Mapping[str, object] = field(default_factory=dict, hash=False)
    ended: bool = False


@dataclass(frozen=True)
class Request:
    """One question: may `principal` do `action` to `resource`? In CEL: `request.{action,
    context}`; `context` carries call facts such as `time` and `request_id`."""

    principal: Principal
    resource: Resource
    action: str
    session: Session = field(default_factory=Session)
    context: Mapping[str, object] = field(default_factory=dict, hash=False)


# --- the answer ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceStep:
    """One step of an explain trace. `detail` may carry evaluation error text: the trace is for
    privileged callers only, never for the caller being decided about."""

    kind: StepKind
    name: str
    actions_matched: bool | None = None
    roles_matched: Outcome = Outcome.NOT_EVALUATED
    condition: Outcome = Outcome.NOT_EVALUATED
    effect: Effect | None = None
    detail: str = ""


@dataclass(frozen=True)
class Decision:
    """The answer. `rule` names the rule that decided (for CONDITION_ERROR, the rule whose
    evaluation failed); `bundle_version` is the deciding bundle's content hash; `principal_id`
    is the principal the effect is about (in a delegation chain, the most restricted one).
    `trace` is None unless an explanation was asked for."""

    effect: Effect
    reason: Reason
    bundle_version: str
    principal_id: str
    rule: str | None = None
    approver_roles: tuple[str, ...] = ()
    approval_ttl_seconds: int | None = None
    trace: tuple[TraceStep, ...] | None = None

    @property
    def allowed(self) -> bool:
        return self.effect is Effect.ALLOW


# --- stored versions -------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredBundle:
    """One immutable version of a tenant's bundle as stored: `version_id` is the content hash;
    `source` is the document as put ("" in listings)."""

    version_id: str
    label: str
    format: str
    resource_kinds: tuple[str, ...]
    quotas: tuple[str, ...]
    test_count: int
    create_principal: str
    create_time: float
    source: str = ""
    active: bool = False
