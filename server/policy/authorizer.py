"""The authorize layer's `Authorizer`, decided by the policy engine.

Each RPC's declared permission is an action on the resource kind `trustplane.method`
(resource id = the permission). The decision has three parts, all of which must allow:

1. the platform bundle (`engine.platform_bundle()`, built from `server.permissions`'
   ROLE_GRANTS) over the caller's roles — and, for a delegated token, over the stored roles of
   every delegate of its `act` chain the Auth service knows (`server.policy.principals`): an
   agent acting for a user may do only what both may; a disabled (or expired) delegate may do
   nothing;
2. the credential's scopes, which only narrow (as before the policy engine existed);
3. the tenant's active bundle, which can only restrict: when it has a `trustplane.method`
   policy, a DENY rule that matches, a condition that fails to evaluate (fail closed) or a
   REQUIRE_APPROVAL (suite methods cannot wait for approvals) for the subject or any principal
   of its delegation chain (with its stored roles and attributes) denies; its ALLOW rules and
   its default deny change nothing, so a tenant can never grant more than the platform does.

`policy.bundles.*` is exempt from part 3, so a tenant whose bundle locks everyone out of
something can always repair the bundle. Decisions are cached per (version, inputs).
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from dataclasses import dataclass

from server.actor import ActorContext
from server.permissions import Decision, any_matches
from server.policy import engine
from server.policy.active import ActiveBundles
from server.policy.engine import CompiledBundle
from server.policy.model import Decision as PolicyDecision
from server.policy.model import Effect, Principal, Reason, Request, Resource
from server.policy.principals import (
    CallPrincipals,
    PrincipalDirectory,
    call_principals,
    principal_key,
)

METHOD_KIND = "trustplane.method"
REPAIR_PERMISSIONS = ("policy.bundles.",)
"""Permissions a tenant bundle cannot restrict (see the module docstring)."""

_NO_ROLE = "no role of the caller grants it"
_NO_SCOPE = "the credential's scopes do not include it"
_RESOURCE_MAX = 256


@dataclass(frozen=True)
class _Outcome:
    """A decision before it is recorded: its effect, the reason code and rule for the audit
    line, and the version that decided."""

    allowed: bool
    code: str  # ALLOWED, NO_MATCHING_RULE, SCOPE_MISSING, PRINCIPAL_DISABLED or an engine reason
    version: str
    rule: str | None = None
    message: str = ""


class PolicyAuthorizer:
    """`interceptors.authorize.Authorizer` through the policy engine."""

    def __init__(self, bundles: ActiveBundles, directory: PrincipalDirectory | None = None) -> None:
        self._bundles = bundles
        self._directory = directory
        self._platform = engine.platform_bundle()
        self._platform_decisions: dict[tuple[frozenset[str], str], bool] = {}
        self._allowed = _Outcome(True, Reason.ALLOWED.value, self._platform.content_hash)
        # The audit line after its decision id, per what it says (bounded; the messages, which
        # may name principals, are not part of it).
        self._lines: dict[tuple[bool, str, str | None, str, str], str] = {}

    async def decide(self, actor: ActorContext, permission: str) -> Decision:
        """The decision, with its audit line: decision id, effect, reason, rule, version
        prefix, resource and action, as Check's `decision.<n>` attributes."""
        outcome = await self._outcome(actor, permission)
        key = (outcome.allowed, outcome.code, outcome.rule, outcome.version, permission)
        rest = self._lines.get(key)
        if rest is None:
            rest = " ".join(
                [
                    "ALLOW" if outcome.allowed else "DENY",
                    outcome.code,
                    outcome.rule or "-",
                    outcome.version[:16] or "-",
                    f"{METHOD_KIND}/{permission}"[:_RESOURCE_MAX],
                    permission[:_RESOURCE_MAX],
                ]
            )
            if len(self._lines) > 4096:
                self._lines.clear()
            self._lines[key] = rest
        return Decision(outcome.allowed, outcome.message, audit=f"{os.urandom(16).hex()} {rest}")

    async def _outcome(self, actor: ActorContext, permission: str) -> _Outcome:
        platform = self._platform.content_hash
        if not self._platform_allows(actor.roles, permission):
            return _Outcome(False, Reason.NO_MATCHING_RULE.value, platform, message=_NO_ROLE)
        if not scopes_allow(actor.scopes, permission):
            return _Outcome(False, "SCOPE_MISSING", platform, message=_NO_SCOPE)
        bundle = None
        if tenant_may_restrict(permission):
            bundle = await self._bundles.get(actor.tenant_id)
        restricting = bundle is not None and bundle.has_policy(METHOD_KIND)
        if not restricting and not actor.act:
            # Nothing left to decide: no delegate whose roles or kill switch could refuse, and
            # no tenant rule (the subject's own stored facts are read only for those rules).
            return self._allowed
        principals = await call_principals(self._directory, actor, subject_attributes=restricting)
        refused = self._chain_refusal(principals, permission)
        if refused is not None:
            return refused
        if bundle is None or not restricting:
            return self._allowed
        restriction = self._tenant_restriction(bundle, principals, permission)
        if restriction is None:
            return self._allowed
        rule = f" (rule {restriction.rule})" if restriction.rule else ""
        return _Outcome(
            False,
            restriction.reason.value,
            restriction.bundle_version,
            restriction.rule,
            f"the tenant's policy {_verb(restriction)} it{rule}",
        )

    def _chain_refusal(self, principals: CallPrincipals, permission: str) -> _Outcome | None:
        """Delegation is the intersection: each known delegate's own roles must grant it."""
        platform = self._platform.content_hash
        if principals.disabled is not None:
            message = f"{principals.disabled} in the call is disabled"
            return _Outcome(False, "PRINCIPAL_DISABLED", platform, message=message)
        for delegate in principals.delegates:
            known = delegate.id in principals.known
            if known and not self._platform_allows(delegate.roles, permission):
                message = f"no role of {delegate.id} (delegation chain) grants it"
                return _Outcome(False, Reason.NO_MATCHING_RULE.value, platform, message=message)
        return None

    def _platform_allows(self, roles: frozenset[str], permission: str) -> bool:
        key = (roles, permission)
        allowed = self._platform_decisions.get(key)
        if allowed is None:
            request = Request(Principal("", roles), Resource(METHOD_KIND, permission), permission)
            allowed = engine.decide(self._platform, request).allowed
            if len(self._platform_decisions) > 65_536:
                self._platform_decisions.clear()
            self._platform_decisions[key] = allowed
        return allowed

    def _tenant_restriction(
        self, bundle: CompiledBundle, principals: CallPrincipals, permission: str
    ) -> PolicyDecision | None:
        """The first restricting decision over the subject and its delegation chain."""
        for principal in (principals.subject, *principals.delegates):
            decision = self._decide(bundle, principal, permission)
            if restricts(decision):
                return decision
        return None

    def _decide(
        self, bundle: CompiledBundle, principal: Principal, permission: str
    ) -> PolicyDecision:
        cache = self._bundles.decisions
        key: Hashable = ("method", bundle.content_hash, principal_key(principal), permission)
        decision = cache.get(key)
        if decision is None:
            request = Request(principal, Resource(METHOD_KIND, permission), permission)
            decision = engine.decide(bundle, request)
            cache.put(key, decision)
        return decision


def scopes_allow(scopes: frozenset[str] | None, permission: str) -> bool:
    """Part 2: a credential's scopes (None: no restriction) include the permission."""
    return scopes is None or any_matches(scopes, permission)


def tenant_may_restrict(permission: str) -> bool:
    """Part 3 applies: everything but the repair permissions."""
    return not permission.startswith(REPAIR_PERMISSIONS)


def restricts(decision: PolicyDecision) -> bool:
    """Whether a tenant's decision on a suite method takes something away."""
    return decision.effect is not Effect.ALLOW and decision.reason is not Reason.NO_MATCHING_RULE


def _verb(decision: PolicyDecision) -> str:
    if decision.reason is Reason.CONDITION_ERROR:
        return "could not evaluate a condition for"
    if decision.effect is Effect.REQUIRE_APPROVAL:
        return "requires an approval (not available for trustplane methods) for"
    return "denies"
