"""The Policy service's domain logic: bundle lifecycle, Check, Explain, Filter and quotas.

`PolicyEngine` owns the lifecycle (put → validated and stored as an immutable version;
activate; roll back; each activation announced to every process) and answers questions:

* Check: for one principal (the caller unless `policy.decisions.check_others` is held), every
  resource x action. Rules decide first (the engine, through the decision cache); an ALLOW,
  or a REQUIRE_APPROVAL presented with an approval token, then consumes the quotas that apply,
  atomically in the cache (`Cache.charge`) and at most once per request id (a receipt per
  decision); only then is the token redeemed through the `ApprovalRedeemer` (none wired: fail
  closed), and a refused token gives the charge back. The decisions
  (`decision_attributes`) go into the Check call's own audit entry, an access-class entry
  queued without waiting for the write (unless the bounded queue is full: back-pressure).
* Explain: one decision with the evaluation trace; nothing consumed or redeemed.
* Filter: the allowed subset of candidates, a page at a time, every candidate decided.

No gRPC, no SQL here: the servicer decodes and encodes, the store holds the SQL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from trustplane.common.v1 import error_reason_pb2 as reasons

from server.actor import ActorContext
from server.cache import Cache, CacheUnavailable, Charge
from server.config import PolicyConfig
from server.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TrustplaneError,
)
from server.page_token import PageTokens, page_size
from server.permissions import Decision as PermissionDecision
from server.policy import engine
from server.policy.active import ActiveBundles
from server.policy.authorizer import (
    METHOD_KIND,
    restricts,
    scopes_allow,
    tenant_may_restrict,
)
from server.policy.engine import CompiledBundle
from server.policy.model import (
    Decision,
    Effect,
    Principal,
    Quota,
    QuotaScope,
    Reason,
    Request,
    Resource,
    Session,
    StoredBundle,
    TraceStep,
)
from server.policy.principals import PrincipalDirectory, call_principals, frozen, principal_key

CHECK_OTHERS = "policy.decisions.check_others"
MAX_COST = 10**9
_NAME_MAX = 256

_log = logging.getLogger("trustplane.policy")


# --- what the service depends on ------------------------------------------------------------


class ApprovalRedeemer(Protocol):
    """Redeems a single-use approval token bound to (call digest, requester, session): returns
    once for a valid token and raises a TrustplaneError otherwise (already redeemed, another
    digest or requester, expired, its session ended). The Session service (`SessionManager`)
    implements it; app.py wires it."""

    async def redeem_approval(
        self,
        tenant_id: str,
        token: str,
        *,
        digest: bytes,
        principal_id: str,
        session_id: str | None,
    ) -> object: ...


class _SessionState(Protocol):
    @property
    def value(self) -> str: ...
    @property
    def terminal(self) -> bool: ...


class StoredSession(Protocol):
    """What a decision needs of a stored agent session (the Session service's AgentSession)."""

    @property
    def id(self) -> str: ...
    @property
    def agent_id(self) -> str: ...
    @property
    def user_id(self) -> str | None: ...
    @property
    def created_by(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def parent_session_id(self) -> str | None: ...
    @property
    def labels(self) -> tuple[str, ...]: ...
    @property
    def metadata(self) -> Mapping[str, object]: ...
    @property
    def state(self) -> _SessionState: ...


class SessionSource(Protocol):
    """Reads the agent session a decision runs in: the tenant's session as of now (past its
    expiry it reads as expired), None when the tenant has none with that id. Fast: a cached
    GetSession-like read. The Session service (`SessionManager`) implements it."""

    async def session_for_policy(self, tenant_id: str, session_id: str) -> StoredSession | None: ...


class PermissionChecker(Protocol):
    """Decides a permission for a caller (the authorizer), for `check_others`."""

    async def decide(self, actor: ActorContext, permission: str) -> PermissionDecision: ...


class BundleStore(Protocol):
    async def put(self, tenant_id: str, bundle: StoredBundle) -> StoredBundle: ...
    async def get(self, tenant_id: str, version_id: str) -> StoredBundle: ...
    async def active(self, tenant_id: str) -> StoredBundle | None: ...
    async def list(
        self, tenant_id: str, limit: int, after: tuple[float, str] | None
    ) -> list[StoredBundle]: ...
    async def activate(
        self, tenant_id: str, version_id: str, principal: str, now: float
    ) -> None: ...
    async def rollback(self, tenant_id: str, now: float) -> str | None: ...


# --- errors ---------------------------------------------------------------------------------


class BundleInvalid(InvalidArgument):
    reason = reasons.ERROR_REASON_POLICY_BUNDLE_INVALID
    default_message = "invalid policy bundle"


class NoPreviousVersion(FailedPrecondition):
    reason = reasons.ERROR_REASON_POLICY_NO_PREVIOUS_VERSION
    default_message = "there is no earlier activation to roll back to"


class TooLarge(InvalidArgument):
    reason = reasons.ERROR_REASON_POLICY_REQUEST_TOO_LARGE


class CheckOthersDenied(PermissionDenied):
    reason = reasons.ERROR_REASON_POLICY_CHECK_OTHERS_DENIED
    default_message = f"deciding for another principal needs {CHECK_OTHERS}"


class QuotaNotFound(NotFound):
    reason = reasons.ERROR_REASON_POLICY_QUOTA_NOT_FOUND
    default_message = "no such quota in the active policy bundle"


class PolicySessionNotFound(NotFound):
    reason = reasons.ERROR_REASON_POLICY_SESSION_NOT_FOUND
    default_message = "no such agent session for the caller"


class SessionMismatch(PermissionDenied):
    reason = reasons.ERROR_REASON_POLICY_SESSION_MISMATCH
    default_message = "the credential is bound to another agent session"


# --- questions and answers ------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """A Check, Explain or Filter in domain terms. `principal` None means the caller."""

    resources: tuple[Resource, ...]
    actions: tuple[str, ...]
    principal: Principal | None = None
    delegates: tuple[Principal, ...] = ()
    session: Session = dataclasses.field(default_factory=Session)
    context: Mapping[str, object] = dataclasses.field(default_factory=dict)
    request_id: str = ""
    approval_token: str = ""
    cost: int = 0


@dataclass(frozen=True)
class QuotaState:
    """A quota's counter for one subject in its current window."""

    quota: Quota
    subject: str
    used: int
    reset_time: float
    exceeded: bool = False

    @property
    def remaining(self) -> int:
        return max(self.quota.limit - self.used, 0)


@dataclass(frozen=True)
class Verdict:
    """One answered resource x action."""

    resource_index: int
    action: str
    effect: Effect
    reason: Reason
    rule: str | None
    version_id: str
    decision_id: str
    principal_id: str
    approver_roles: tuple[str, ...] = ()
    approval_ttl_seconds: int | None = None
    call_digest: bytes = b""
    quotas: tuple[QuotaState, ...] = ()


@dataclass(frozen=True)
class FilterPage:
    """One page of a Filter: candidates `start` .. `start + evaluated - 1` were decided, the
    `allowed` ones (index, resource) are listed; `decision_id` names the page's decisions."""

    allowed: tuple[tuple[int, Resource], ...]
    next_page_token: str
    evaluated: int
    version_id: str
    decision_id: str = ""
    start: int = 0


@dataclass(frozen=True)
class _Asked:
    """A question resolved against the caller: who, through whom, in which tenant and which
    session (`session_key`: its part of every decision-cache key, computed once)."""

    tenant_id: str
    principal: Principal
    delegates: tuple[Principal, ...]
    agent_id: str
    session: Session = dataclasses.field(default_factory=Session)
    session_key: Hashable = ()
    known: frozenset[str] = frozenset()  # delegates the Auth service knows (real roles)
    # The caller's credential scopes when it asks about itself (None: unrestricted, or a
    # question about someone else, who has no credential here): they narrow suite methods.
    scopes: frozenset[str] | None = None


@dataclass(frozen=True)
class _Charged:
    """A quota charge made by this call (to refund if the decision does not stand)."""

    charges: tuple[Charge, ...]
    receipt: str | None


_NO_BUNDLE_VERSION = ""


class PolicyEngine:
    """See the module docstring."""

    def __init__(
        self,
        store: BundleStore,
        bundles: ActiveBundles,
        cache: Cache,
        permissions: PermissionChecker,
        config: PolicyConfig,
        page_tokens: PageTokens,
        *,
        redeemer: ApprovalRedeemer | None = None,
        sessions: SessionSource | None = None,
        principals: PrincipalDirectory | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._bundles = bundles
        self._cache = cache
        self._permissions = permissions
        self._config = config
        self._page_tokens = page_tokens
        self._redeemer = redeemer
        self._sessions = sessions
        self._principals = principals
        self._clock = clock
        self._platform = engine.platform_bundle()

    # --- lifecycle ----------------------------------------------------------------------------

    async def put_bundle(
        self, actor: ActorContext, source: str, format: str | None, activate: bool
    ) -> StoredBundle:
        """Validate, compile and store a version (the same content is the same version)."""
        try:
            compiled = engine.parse_bundle(source, format=format)
        except InvalidArgument as error:
            raise BundleInvalid(error.message, field_violations=error.field_violations) from None
        detected = format or ("json" if source.lstrip().startswith("{") else "yaml")
        bundle = compiled.bundle
        stored = await self._store.put(
            actor.tenant_id,
            StoredBundle(
                version_id=compiled.content_hash,
                label=bundle.version,
                format=detected,
                resource_kinds=tuple(p.resource for p in bundle.resource_policies),
                quotas=tuple(q.name for q in bundle.quotas),
                test_count=len(bundle.tests),
                create_principal=actor.subject,
                create_time=self._clock(),
                source=source,
            ),
        )
        if activate:
            return await self.activate(actor, stored.version_id)
        return stored

    async def get_bundle(self, tenant_id: str, version_id: str) -> StoredBundle:
        """One version (empty id: the active one)."""
        if not version_id:
            active = await self._store.active(tenant_id)
            if active is None:
                raise NotFound("the tenant has no active policy bundle")
            return active
        return await self._store.get(tenant_id, _version_id(version_id))

    async def list_bundles(
        self, tenant_id: str, size: int, token: str
    ) -> tuple[list[StoredBundle], str]:
        limit = page_size(size)
        query = f"policy.bundles/{tenant_id}"
        after = None
        if token:
            position = self._page_tokens.decode(query, token)
            after = (float(position["t"]), str(position["v"]))
        found = await self._store.list(tenant_id, limit + 1, after)
        if len(found) <= limit:
            return found, ""
        last = found[limit - 1]
        return found[:limit], self._page_tokens.encode(
            query, {"t": last.create_time, "v": last.version_id}
        )

    async def activate(self, actor: ActorContext, version_id: str) -> StoredBundle:
        """Make a stored version active in every process."""
        version_id = _version_id(version_id)
        await self._store.activate(actor.tenant_id, version_id, actor.subject, self._clock())
        await self._bundles.announce(actor.tenant_id)
        return await self._store.get(actor.tenant_id, version_id)

    async def rollback(self, actor: ActorContext) -> StoredBundle:
        """Undo the newest activation."""
        version_id = await self._store.rollback(actor.tenant_id, self._clock())
        if version_id is None:
            raise NoPreviousVersion()
        await self._bundles.announce(actor.tenant_id)
        return await self._store.get(actor.tenant_id, version_id)

    # --- decisions ----------------------------------------------------------------------------

    async def check(self, actor: ActorContext, question: Question) -> list[Verdict]:
        """Decide every resource x action; see the module docstring."""
        _validate(question, self._config)
        if len(question.resources) * len(question.actions) > self._config.max_checks:
            raise TooLarge(f"at most {self._config.max_checks} resources x actions per Check")
        if question.approval_token and len(question.resources) * len(question.actions) != 1:
            raise InvalidArgument.fields(
                FieldViolation("approval_token", "needs exactly one resource and one action")
            )
        asked = await self._asked(actor, question)
        bundle = await self._bundles.get(asked.tenant_id)
        ids = _decision_ids(len(question.resources) * len(question.actions))
        verdicts = []
        for index, resource in enumerate(question.resources):
            for action in question.actions:
                request = self._request(asked, resource, action, question)
                decision = self._decide(bundle, request, asked)
                verdict = self._verdict(index, request, decision, asked.tenant_id, next(ids))
                if asked.session.ended:
                    verdicts.append(_ended(verdict))
                    continue
                verdicts.append(
                    await self._settle(actor, asked, bundle, request, verdict, question)
                )
        return verdicts

    async def explain(
        self, actor: ActorContext, question: Question
    ) -> tuple[Verdict, tuple[TraceStep, ...]]:
        """One decision and its trace; nothing consumed, nothing redeemed."""
        missing = [
            FieldViolation(name, "required")
            for name, given in (("resource", question.resources), ("action", question.actions))
            if not given
        ]
        if missing:
            raise InvalidArgument.fields(*missing)
        _validate(question, self._config, "resource")
        asked = await self._asked(actor, question)
        bundle = await self._bundles.get(asked.tenant_id)
        request = self._request(asked, question.resources[0], question.actions[0], question)
        decision = self._decide(bundle, request, asked, explain=True)
        verdict = self._verdict(0, request, decision, asked.tenant_id, next(_decision_ids(1)))
        if asked.session.ended:
            verdict = _ended(verdict)
        return verdict, decision.trace or ()

    async def filter(
        self, actor: ActorContext, question: Question, size: int, token: str
    ) -> FilterPage:
        """The allowed candidates (effect ALLOW), a page of at most `size` at a time."""
        _validate(question, self._config, "candidates")
        if len(question.resources) > self._config.max_filter_candidates:
            raise TooLarge(f"at most {self._config.max_filter_candidates} candidates per Filter")
        limit = page_size(size)
        asked = await self._asked(actor, question)
        query = "policy.filter/" + _fingerprint(asked, question)
        start = int(self._page_tokens.decode(query, token)["i"]) if token else 0
        bundle = await self._bundles.get(asked.tenant_id)
        allowed: list[tuple[int, Resource]] = []
        index = start
        while index < len(question.resources) and len(allowed) < limit:
            resource = question.resources[index]
            request = self._request(asked, resource, question.actions[0], question)
            if self._decide(bundle, request, asked).allowed and not asked.session.ended:
                allowed.append((index, resource))
            index += 1
        more = index < len(question.resources)
        next_token = self._page_tokens.encode(query, {"i": index}) if more else ""
        version = bundle.content_hash if bundle is not None else _NO_BUNDLE_VERSION
        decision_id = next(_decision_ids(1))
        return FilterPage(tuple(allowed), next_token, index - start, version, decision_id, start)

    async def _asked(self, actor: ActorContext, question: Question) -> _Asked:
        if question.principal is None and not question.delegates:
            principals = await call_principals(self._principals, actor, subject_attributes=True)
            if principals.disabled is not None:
                raise PermissionDenied(f"{principals.disabled} in the call is disabled")
            session = await self._session(actor, question.session, others=False)
            asked = _Asked(
                actor.tenant_id,
                principals.subject,
                principals.delegates,
                actor.actor_id,
                known=principals.known,
                scopes=actor.scopes,
            )
            return _in_session(asked, session)
        if not (await self._permissions.decide(actor, CHECK_OTHERS)).allowed:
            raise CheckOthersDenied()
        base = question.principal
        if base is None:  # the caller, through explicit delegates
            own = await call_principals(self._principals, actor, subject_attributes=True)
            base = own.subject
        delegates = tuple(
            dataclasses.replace(d, tenant=actor.tenant_id, chain=()) for d in question.delegates
        )
        principal = dataclasses.replace(
            base, tenant=actor.tenant_id, chain=tuple(d.id for d in delegates)
        )
        agent = delegates[0].id if delegates else principal.id
        session = await self._session(actor, question.session, others=True)
        # The roles the question gives its delegates are the ones to decide with.
        known = frozenset(d.id for d in delegates)
        asked = _Asked(actor.tenant_id, principal, delegates, agent, known=known)
        return _in_session(asked, session)

    async def _session(self, actor: ActorContext, asked: Session, *, others: bool) -> Session:
        """The session the decisions run in. A stored one — named in the request, or the one
        the credential is bound to (`asid`) — is read from the Session service: its labels
        (the request's can only add to them) and its attributes. A self-check may name only a
        session the caller takes part in; with `check_others`, any of the tenant."""
        bound = actor.agent_session_id
        if bound and asked.id and asked.id != bound:
            raise SessionMismatch()
        session_id = asked.id or bound
        if not session_id:
            return asked  # outside any session: the call's own labels, nothing to read
        if asked.attr:
            raise InvalidArgument.fields(
                FieldViolation("session.attr", "a stored session's attributes are the server's")
            )
        stored = None
        if self._sessions is not None and len(session_id) <= _NAME_MAX:
            stored = await self._sessions.session_for_policy(actor.tenant_id, session_id)
        if stored is None or not (others or _takes_part(actor, stored)):
            raise PolicySessionNotFound()
        return Session(
            id=stored.id,
            labels=frozenset(stored.labels) | asked.labels,
            attr=_session_attributes(stored),
            ended=stored.state.terminal,
        )

    @staticmethod
    def _request(asked: _Asked, resource: Resource, action: str, question: Question) -> Request:
        return Request(asked.principal, resource, action, asked.session, question.context)

    def _decide(
        self,
        bundle: CompiledBundle | None,
        request: Request,
        asked: _Asked,
        *,
        explain: bool = False,
    ) -> Decision:
        """The rules' decision, through the decision cache (not for explanations)."""
        if explain:
            return self._evaluate(bundle, request, asked, explain=True)
        cache = self._bundles.decisions
        if not cache.enabled:
            return self._evaluate(bundle, request, asked)
        key = _decision_key(bundle, request, asked)
        decision = cache.get(key)
        if decision is None:
            decision = self._evaluate(bundle, request, asked)
            cache.put(key, decision)
        return decision

    def _evaluate(
        self,
        bundle: CompiledBundle | None,
        request: Request,
        asked: _Asked,
        *,
        explain: bool = False,
    ) -> Decision:
        """Suite methods: as the authorize layer decides them. Other kinds: the tenant's
        bundle alone (none: default deny)."""
        delegates = asked.delegates
        if request.resource.kind == METHOD_KIND:
            return self._method(bundle, request, asked, explain=explain)
        if bundle is None:
            return Decision(
                Effect.DENY,
                Reason.NO_MATCHING_RULE,
                _NO_BUNDLE_VERSION,
                request.principal.id,
                trace=() if explain else None,
            )
        return engine.decide_chain(bundle, request, delegates, explain=explain)

    def _method(
        self,
        bundle: CompiledBundle | None,
        request: Request,
        asked: _Asked,
        *,
        explain: bool,
    ) -> Decision:
        """The platform bundle over the subject's roles and over each delegate's the Auth
        service knows (a delegated token's scopes already narrowed the rest), then the first
        restriction the tenant's bundle puts on the subject or any delegate — exactly what
        `PolicyAuthorizer` enforces for the RPC."""
        delegates = asked.delegates
        platform = engine.decide(self._platform, request, explain=explain)
        for delegate in delegates:
            if not platform.allowed:
                break
            if delegate.id in asked.known:
                as_delegate = dataclasses.replace(request, principal=delegate)
                platform = engine.decide(self._platform, as_delegate, explain=explain)
        if not platform.allowed:
            return platform
        permission = request.action  # as for the authorize layer: the action is the permission
        if not scopes_allow(asked.scopes, permission):
            return dataclasses.replace(
                platform, effect=Effect.DENY, reason=Reason.SCOPE_MISSING, rule=None
            )
        if (
            bundle is None
            or not bundle.has_policy(METHOD_KIND)
            or not tenant_may_restrict(permission)
        ):
            return platform
        for principal in (request.principal, *delegates):
            as_principal = dataclasses.replace(request, principal=principal)
            tenant = engine.decide(bundle, as_principal, explain=explain)
            if restricts(tenant):
                return tenant
        return platform

    async def _settle(
        self,
        actor: ActorContext,
        asked: _Asked,
        bundle: CompiledBundle | None,
        request: Request,
        verdict: Verdict,
        question: Question,
    ) -> Verdict:
        """Quotas, then the approval token, on top of the rules' decision. A token is spent
        only on a decision that is otherwise allowed, quotas included: quotas are charged
        first, and refunded if the token is then refused."""
        redeem = verdict.effect is Effect.REQUIRE_APPROVAL and bool(question.approval_token)
        if redeem:
            if self._redeemer is None:
                return dataclasses.replace(
                    verdict, effect=Effect.DENY, reason=Reason.APPROVAL_UNAVAILABLE
                )
            verdict = dataclasses.replace(verdict, effect=Effect.ALLOW, reason=Reason.APPROVED)
        if verdict.effect is not Effect.ALLOW:
            return verdict
        charged: _Charged | None = None
        if bundle is not None:
            match = engine.quotas_for(bundle, request)
            if match.failed is not None:
                return dataclasses.replace(
                    verdict,
                    effect=Effect.DENY,
                    reason=Reason.CONDITION_ERROR,
                    rule=match.failed.name,
                )
            if match.quotas:
                verdict, charged = await self._charge(actor, asked, verdict, match.quotas, question)
        if not redeem or verdict.effect is not Effect.ALLOW:
            return verdict
        if await self._redeem(asked, verdict, question):
            return verdict
        if charged is not None:
            await self._refund(charged)
        return dataclasses.replace(
            verdict, effect=Effect.DENY, reason=Reason.APPROVAL_INVALID, quotas=()
        )

    @staticmethod
    def _verdict(
        index: int, request: Request, decision: Decision, tenant: str, decision_id: str
    ) -> Verdict:
        approval = decision.effect is Effect.REQUIRE_APPROVAL
        return Verdict(
            resource_index=index,
            action=request.action,
            effect=decision.effect,
            reason=decision.reason,
            rule=decision.rule,
            version_id=decision.bundle_version,
            decision_id=decision_id,
            principal_id=decision.principal_id,
            approver_roles=decision.approver_roles,
            approval_ttl_seconds=decision.approval_ttl_seconds,
            call_digest=call_digest(tenant, request) if approval else b"",
        )

    async def _redeem(self, asked: _Asked, verdict: Verdict, question: Question) -> bool:
        """Spend the approval token; False when it is refused (and so not spent)."""
        assert self._redeemer is not None
        try:  # the token was requested by the identity making the call (the acting agent)
            await self._redeemer.redeem_approval(
                asked.tenant_id,
                question.approval_token,
                digest=verdict.call_digest,
                principal_id=asked.agent_id,
                session_id=asked.session.id or None,
            )
        except TrustplaneError:
            return False
        return True

    async def _charge(
        self,
        actor: ActorContext,
        asked: _Asked,
        verdict: Verdict,
        quotas: tuple[Quota, ...],
        question: Question,
    ) -> tuple[Verdict, _Charged | None]:
        """Consume the quotas; the charge made (None: refused, or a retry's receipt)."""
        now = self._clock()
        cost = question.cost or 1
        subjects = [_subject(q, asked) for q in quotas]
        windows = [_window(q, now) for q in quotas]
        charges = [
            Charge(_quota_key(asked.tenant_id, q, s, w), cost, q.limit, reset - now + 1.0)
            for q, s, (w, reset) in zip(quotas, subjects, windows, strict=True)
        ]
        receipt = None
        if question.request_id:
            receipt = _receipt_key(actor, asked, question.request_id, verdict)
        result = await self._cache.charge(charges, receipt, self._config.receipt_ttl)
        states = tuple(
            QuotaState(q, s, used, reset, exceeded=not result.charged and used + cost > q.limit)
            for q, s, used, (_, reset) in zip(quotas, subjects, result.values, windows, strict=True)
        )
        if result.charged:
            made = None if result.replayed else _Charged(tuple(charges), receipt)
            return dataclasses.replace(verdict, quotas=states), made
        stopper = next(s for s in states if s.exceeded)
        denied = dataclasses.replace(
            verdict,
            effect=Effect.DENY,
            reason=Reason.QUOTA_EXCEEDED,
            rule=stopper.quota.name,
            quotas=states,
        )
        return denied, None

    async def _refund(self, charged: _Charged) -> None:
        """Give back a charge whose decision did not stand. Best effort: if the cache cannot
        be reached the units stay consumed (the safe side)."""
        try:
            for charge in charged.charges:
                await self._cache.incr(charge.key, -charge.amount, ttl=charge.ttl)
            if charged.receipt is not None:
                await self._cache.delete(charged.receipt)
        except CacheUnavailable:
            _log.warning("quota refund lost; the units stay consumed")

    # --- quotas -------------------------------------------------------------------------------

    async def quota_usage(self, actor: ActorContext, name: str, subject: str) -> QuotaState:
        quota = (await self._active_quotas(actor.tenant_id, name))[0]
        return await self._usage(actor.tenant_id, quota, subject)

    async def list_quota_usage(self, actor: ActorContext, subject: str) -> list[QuotaState]:
        quotas = await self._active_quotas(actor.tenant_id, None)
        return [await self._usage(actor.tenant_id, q, subject) for q in quotas]

    async def reset_quota(self, actor: ActorContext, name: str, subject: str) -> QuotaState:
        quota = (await self._active_quotas(actor.tenant_id, name))[0]
        window, _ = _window(quota, self._clock())
        await self._cache.delete(
            _quota_key(actor.tenant_id, quota, _scoped(quota, subject), window)
        )
        return await self._usage(actor.tenant_id, quota, subject)

    async def _active_quotas(self, tenant_id: str, name: str | None) -> tuple[Quota, ...]:
        bundle = await self._bundles.get(tenant_id)
        quotas = bundle.bundle.quotas if bundle is not None else ()
        if name is None:
            return quotas
        found = tuple(q for q in quotas if q.name == name)
        if not found:
            raise QuotaNotFound(metadata={"quota": name[:_NAME_MAX]})
        return found

    async def _usage(self, tenant_id: str, quota: Quota, subject: str) -> QuotaState:
        if len(subject) > _NAME_MAX:
            raise InvalidArgument.fields(FieldViolation("subject", "at most 256 characters"))
        scoped = _scoped(quota, subject)
        window, reset = _window(quota, self._clock())
        raw = await self._cache.get(_quota_key(tenant_id, quota, scoped, window))
        return QuotaState(quota, scoped, int(raw) if raw else 0, reset)


# --- helpers --------------------------------------------------------------------------------


def _version_id(value: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise InvalidArgument.fields(
            FieldViolation("version_id", "must be a version id (64 lower-case hex digits)")
        )
    return value


def _validate(question: Question, config: PolicyConfig, what: str = "resources") -> None:
    found = [*_item_violations(question, what), *_caller_violations(question)]
    if found:
        raise InvalidArgument.fields(*found)
    if len(question.delegates) > config.max_delegates:
        raise TooLarge(f"at most {config.max_delegates} delegates")


def _item_violations(question: Question, what: str) -> list[FieldViolation]:
    found: list[FieldViolation] = []
    if not question.resources:
        found.append(FieldViolation(what, "at least one is required"))
    for i, resource in enumerate(question.resources):
        if not resource.kind or len(resource.kind) > _NAME_MAX:
            found.append(FieldViolation(f"{what}[{i}].kind", "required, at most 256 characters"))
        if len(resource.id) > _NAME_MAX:
            found.append(FieldViolation(f"{what}[{i}].id", "at most 256 characters"))
    if not question.actions:
        found.append(FieldViolation("actions", "at least one is required"))
    for i, action in enumerate(question.actions):
        if not action or len(action) > _NAME_MAX:
            found.append(FieldViolation(f"actions[{i}]", "required, at most 256 characters"))
    return found


def _caller_violations(question: Question) -> list[FieldViolation]:
    found: list[FieldViolation] = []
    if question.principal is not None and not question.principal.id:
        found.append(FieldViolation("principal.id", "required when principal is set"))
    if any(not d.id for d in question.delegates):
        found.append(FieldViolation("delegates", "every delegate needs an id"))
    if len(question.approval_token) > 1024:
        found.append(FieldViolation("approval_token", "at most 1024 characters"))
    if not 0 <= question.cost <= MAX_COST:
        found.append(FieldViolation("cost", f"must be in 0..{MAX_COST}"))
    return found


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def call_digest(tenant_id: str, request: Request) -> bytes:
    """SHA-256 of the exact call an approval is for: tenant, principal, session, resource
    (kind, id, attributes) and action. Request context (time, ids) is not part of it."""
    body = {
        "tenant": tenant_id,
        "principal": request.principal.id,
        "session": request.session.id,
        "resource": {
            "kind": request.resource.kind,
            "id": request.resource.id,
            "attr": dict(request.resource.attr),
        },
        "action": request.action,
    }
    return hashlib.sha256(_canonical(body).encode()).digest()


def _decision_key(bundle: CompiledBundle | None, request: Request, asked: _Asked) -> Hashable:
    """Everything the decision depends on: the deciding versions and every engine input (the
    session's part computed once per question, `asked.session_key`)."""
    resource = request.resource
    return (
        "check",
        bundle.content_hash if bundle is not None else "",
        principal_key(request.principal),
        tuple(principal_key(d) for d in asked.delegates),
        asked.known,
        asked.scopes if resource.kind == METHOD_KIND else None,  # they narrow only suite methods
        resource.kind,
        resource.id,
        frozen(resource.attr) if resource.attr else (),
        request.action,
        asked.session_key,
        frozen(request.context) if request.context else (),
    )


def _session_key(session: Session) -> Hashable:
    return (session.id, session.labels, frozen(session.attr) if session.attr else ())


def _in_session(asked: _Asked, session: Session) -> _Asked:
    return dataclasses.replace(asked, session=session, session_key=_session_key(session))


def _takes_part(actor: ActorContext, session: StoredSession) -> bool:
    """Whether the caller (anyone in its chain) is the session's agent, user or creator."""
    return bool({session.agent_id, session.user_id, session.created_by} & set(actor.chain))


def _session_attributes(session: StoredSession) -> dict[str, object]:
    """`session.attr` of a stored session: the server's facts about it, never the caller's."""
    attributes: dict[str, object] = {
        "state": session.state.value,
        "agent_id": session.agent_id,
        "role": session.role,
        "metadata": dict(session.metadata),
    }
    if session.user_id:
        attributes["user_id"] = session.user_id
    if session.parent_session_id:
        attributes["parent_session_id"] = session.parent_session_id
    return attributes


def _ended(verdict: Verdict) -> Verdict:
    """In an ended session nothing is allowed (no approval redeemed, no quota consumed)."""
    return dataclasses.replace(
        verdict,
        effect=Effect.DENY,
        reason=Reason.SESSION_ENDED,
        rule=None,
        approver_roles=(),
        approval_ttl_seconds=None,
        call_digest=b"",
    )


def _fingerprint(asked: _Asked, question: Question) -> str:
    """What a Filter page token is bound to: the whole query except the page fields."""
    body = [
        asked.tenant_id,
        principal_key(asked.principal),
        [principal_key(d) for d in asked.delegates],
        question.actions,
        [[r.kind, r.id, dict(r.attr)] for r in question.resources],
        [asked.session.id, sorted(asked.session.labels), dict(asked.session.attr)],
        dict(question.context),
    ]
    return hashlib.sha256(_canonical(body).encode()).hexdigest()


def _subject(quota: Quota, asked: _Asked) -> str:
    if quota.per is QuotaScope.TENANT:
        return ""
    if quota.per is QuotaScope.PRINCIPAL:
        return asked.principal.id
    if quota.per is QuotaScope.AGENT:
        return asked.agent_id
    return asked.session.id


def _scoped(quota: Quota, subject: str) -> str:
    return "" if quota.per is QuotaScope.TENANT else subject


def _window(quota: Quota, now: float) -> tuple[int, float]:
    """The current fixed window's index and the time it ends."""
    index = int(now // quota.window_seconds)
    return index, float((index + 1) * quota.window_seconds)


def _tag(tenant_id: str) -> str:
    """A Redis Cluster hash tag: every key of one tenant's charge lands in one slot."""
    return "{" + tenant_id.replace("}", "") + "}"


def _quota_key(tenant_id: str, quota: Quota, subject: str, window: int) -> str:
    ident = hashlib.sha256(_canonical([quota.name, quota.per.value, subject]).encode()).hexdigest()
    return f"policy:quota:{_tag(tenant_id)}:{ident[:32]}:{window}"


def _receipt_key(actor: ActorContext, asked: _Asked, request_id: str, verdict: Verdict) -> str:
    """One receipt per (caller, request id, principal, resource index, action)."""
    body = [actor.subject, actor.actor_id, request_id, asked.principal.id]
    body += [str(verdict.resource_index), verdict.action]
    ident = hashlib.sha256(_canonical(body).encode()).hexdigest()
    return f"policy:receipt:{_tag(asked.tenant_id)}:{ident[:32]}"


def decision_attributes(question: Question, verdicts: Sequence[Verdict]) -> dict[str, str]:
    """A Check's decisions for its audit entry, one attribute each (`decision.<n>`: id,
    effect, reason, rule, version prefix, resource kind/id, action): never attribute values."""
    attributes = {}
    for n, v in enumerate(verdicts):
        resource = question.resources[v.resource_index]
        attributes[f"decision.{n}"] = " ".join(
            [
                v.decision_id,
                v.effect.value,
                v.reason.value,
                v.rule or "-",
                v.version_id[:16] or "-",
                f"{resource.kind}/{resource.id}"[:_NAME_MAX],
                v.action[:_NAME_MAX],
            ]
        )
    return attributes


def filter_attributes(question: Question, page: FilterPage) -> dict[str, str]:
    """A Filter page's decisions for its audit entry: `filter` = decision id, version prefix,
    action, first candidate index and how many were decided; `filter.allowed` = the indexes
    of the allowed candidates (`-`: none); every other candidate of the range was denied."""
    summary = [
        page.decision_id,
        page.version_id[:16] or "-",
        question.actions[0][:_NAME_MAX],
        f"from={page.start}",
        f"evaluated={page.evaluated}",
    ]
    allowed = ",".join(str(index) for index, _ in page.allowed)
    return {"filter": " ".join(summary), "filter.allowed": allowed or "-"}


def _decision_ids(count: int) -> Iterator[str]:
    """`count` random 128-bit ids (hex), drawn from the OS in one call."""
    raw = os.urandom(16 * count).hex()
    return (raw[32 * i : 32 * (i + 1)] for i in range(count))
