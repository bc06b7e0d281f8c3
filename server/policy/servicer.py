"""PolicyService gRPC adapter: decode the request, make one PolicyEngine call, encode the reply."""

from __future__ import annotations

from typing import Any

from google.protobuf import duration_pb2
from trustplane.policy.v1 import policy_pb2, policy_pb2_grpc

from server import call_state, wire
from server.actor import ActorContext
from server.errors import FieldViolation, InvalidArgument
from server.policy.model import Effect, Outcome, Principal, QuotaScope, Reason, Resource, Session
from server.policy.model import TraceStep as Step
from server.policy.service import (
    PolicyEngine,
    Question,
    QuotaState,
    Verdict,
    decision_attributes,
    filter_attributes,
)

_FORMATS = {
    policy_pb2.BUNDLE_FORMAT_UNSPECIFIED: None,
    policy_pb2.BUNDLE_FORMAT_YAML: "yaml",
    policy_pb2.BUNDLE_FORMAT_JSON: "json",
}
_FORMAT_OUT = {"yaml": policy_pb2.BUNDLE_FORMAT_YAML, "json": policy_pb2.BUNDLE_FORMAT_JSON}
_EFFECTS = {
    Effect.ALLOW: policy_pb2.EFFECT_ALLOW,
    Effect.DENY: policy_pb2.EFFECT_DENY,
    Effect.REQUIRE_APPROVAL: policy_pb2.EFFECT_REQUIRE_APPROVAL,
}
_REASONS = {
    reason: policy_pb2.DecisionReason.Value(f"DECISION_REASON_{reason.value}") for reason in Reason
}
_SCOPES = {scope: policy_pb2.QuotaScope.Value(f"QUOTA_SCOPE_{scope.name}") for scope in QuotaScope}
_OUTCOMES = {
    Outcome.TRUE: policy_pb2.OUTCOME_TRUE,
    Outcome.FALSE: policy_pb2.OUTCOME_FALSE,
    Outcome.ERROR: policy_pb2.OUTCOME_ERROR,
    Outcome.NO_CONDITION: policy_pb2.OUTCOME_NO_CONDITION,
    Outcome.NOT_EVALUATED: policy_pb2.OUTCOME_UNSPECIFIED,
}


def _actor() -> ActorContext:
    return call_state.current().require_actor()


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    """One domain call per RPC; no SQL, no try."""

    def __init__(self, policy: PolicyEngine) -> None:
        self._policy = policy

    async def PutBundle(self, request: Any, context: Any) -> Any:
        if request.format not in _FORMATS:
            raise InvalidArgument.fields(FieldViolation("format", "unknown format"))
        bundle = await self._policy.put_bundle(
            _actor(), request.source, _FORMATS[request.format], request.activate
        )
        return policy_pb2.PutBundleResponse(bundle=encode_bundle(bundle, source=True))

    async def GetBundle(self, request: Any, context: Any) -> Any:
        bundle = await self._policy.get_bundle(_actor().tenant_id, request.version_id)
        return policy_pb2.GetBundleResponse(bundle=encode_bundle(bundle, source=True))

    async def ListBundles(self, request: Any, context: Any) -> Any:
        bundles, token = await self._policy.list_bundles(
            _actor().tenant_id, request.page_size, request.page_token
        )
        return policy_pb2.ListBundlesResponse(
            bundles=[encode_bundle(b) for b in bundles], next_page_token=token
        )

    async def ActivateBundle(self, request: Any, context: Any) -> Any:
        bundle = await self._policy.activate(_actor(), request.version_id)
        return policy_pb2.ActivateBundleResponse(bundle=encode_bundle(bundle))

    async def RollbackBundle(self, request: Any, context: Any) -> Any:
        bundle = await self._policy.rollback(_actor())
        return policy_pb2.RollbackBundleResponse(bundle=encode_bundle(bundle))

    async def Check(self, request: Any, context: Any) -> Any:
        question = Question(
            resources=tuple(_resource(r) for r in request.resources),
            actions=tuple(request.actions),
            principal=_principal(request.principal) if request.HasField("principal") else None,
            delegates=tuple(_principal(d) for d in request.delegates),
            session=_session(request.session),
            context=_struct(request, "context"),
            request_id=request.request_id,
            approval_token=request.approval_token,
            cost=request.cost,
        )
        verdicts = await self._policy.check(_actor(), question)
        call_state.current().audit_attributes.update(decision_attributes(question, verdicts))
        return policy_pb2.CheckResponse(decisions=[encode_verdict(v) for v in verdicts])

    async def Explain(self, request: Any, context: Any) -> Any:
        question = Question(
            resources=(_resource(request.resource),) if request.HasField("resource") else (),
            actions=(request.action,) if request.action else (),
            principal=_principal(request.principal) if request.HasField("principal") else None,
            delegates=tuple(_principal(d) for d in request.delegates),
            session=_session(request.session),
            context=_struct(request, "context"),
        )
        verdict, trace = await self._policy.explain(_actor(), question)
        call_state.current().audit_attributes.update(decision_attributes(question, [verdict]))
        return policy_pb2.ExplainResponse(
            decision=encode_verdict(verdict), trace=[_step(s) for s in trace]
        )

    async def Filter(self, request: Any, context: Any) -> Any:
        question = Question(
            resources=tuple(_resource(r) for r in request.candidates),
            actions=(request.action,) if request.action else (),
            principal=_principal(request.principal) if request.HasField("principal") else None,
            delegates=tuple(_principal(d) for d in request.delegates),
            session=_session(request.session),
            context=_struct(request, "context"),
        )
        page = await self._policy.filter(_actor(), question, request.page_size, request.page_token)
        call_state.current().audit_attributes.update(filter_attributes(question, page))
        return policy_pb2.FilterResponse(
            allowed=[
                policy_pb2.FilterResult(index=i, kind=r.kind, id=r.id) for i, r in page.allowed
            ],
            next_page_token=page.next_page_token,
            evaluated=page.evaluated,
            version_id=page.version_id,
            decision_id=page.decision_id,
        )

    async def GetQuotaUsage(self, request: Any, context: Any) -> Any:
        usage = await self._policy.quota_usage(_actor(), request.name, request.subject)
        return policy_pb2.GetQuotaUsageResponse(usage=encode_usage(usage))

    async def ListQuotaUsage(self, request: Any, context: Any) -> Any:
        usages = await self._policy.list_quota_usage(_actor(), request.subject)
        return policy_pb2.ListQuotaUsageResponse(usages=[encode_usage(u) for u in usages])

    async def ResetQuotaUsage(self, request: Any, context: Any) -> Any:
        usage = await self._policy.reset_quota(_actor(), request.name, request.subject)
        return policy_pb2.ResetQuotaUsageResponse(usage=encode_usage(usage))


# --- decoding -------------------------------------------------------------------------------


def _value(value: Any) -> Any:
    """A `google.protobuf.Value` as a plain value, whole numbers as ints (a Struct carries every
    number as a double; bundles written in YAML or JSON compare with ints)."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {k: _value(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_value(v) for v in value.list_value.values]
    return None


def _struct(message: Any, field: str) -> dict[str, Any]:
    if not message.HasField(field):
        return {}
    return {k: _value(v) for k, v in getattr(message, field).fields.items()}


def _principal(message: Any) -> Principal:
    return Principal(
        id=message.id,
        roles=frozenset(message.roles),
        attr=_struct(message, "attr"),
        type=message.type,
    )


def _resource(message: Any) -> Resource:
    return Resource(kind=message.kind, id=message.id, attr=_struct(message, "attr"))


def _session(message: Any) -> Session:
    return Session(id=message.id, labels=frozenset(message.labels), attr=_struct(message, "attr"))


# --- encoding -------------------------------------------------------------------------------


def encode_bundle(bundle: Any, *, source: bool = False) -> Any:
    return policy_pb2.Bundle(
        version_id=bundle.version_id,
        label=bundle.label,
        active=bundle.active,
        format=_FORMAT_OUT.get(bundle.format, policy_pb2.BUNDLE_FORMAT_UNSPECIFIED),
        resource_kinds=list(bundle.resource_kinds),
        quotas=list(bundle.quotas),
        test_count=bundle.test_count,
        create_principal=bundle.create_principal,
        create_time=wire.timestamp(bundle.create_time),
        source=bundle.source if source else "",
    )


def encode_verdict(verdict: Verdict) -> Any:
    decision = policy_pb2.Decision(
        resource_index=verdict.resource_index,
        action=verdict.action,
        effect=_EFFECTS[verdict.effect],
        reason=_REASONS[verdict.reason],
        rule=verdict.rule or "",
        version_id=verdict.version_id,
        decision_id=verdict.decision_id,
        principal_id=verdict.principal_id,
        quotas=[_quota_status(q) for q in verdict.quotas],
    )
    if verdict.effect is Effect.REQUIRE_APPROVAL:
        decision.approval.CopyFrom(
            policy_pb2.ApprovalRequirement(
                approver_roles=list(verdict.approver_roles),
                ttl=duration_pb2.Duration(seconds=verdict.approval_ttl_seconds or 0),
                call_digest=verdict.call_digest,
            )
        )
    return decision


def _quota_status(state: QuotaState) -> Any:
    return policy_pb2.QuotaStatus(
        name=state.quota.name,
        scope=_SCOPES[state.quota.per],
        limit=state.quota.limit,
        remaining=state.remaining,
        reset_time=wire.timestamp(state.reset_time),
        exceeded=state.exceeded,
    )


def encode_usage(state: QuotaState) -> Any:
    return policy_pb2.QuotaUsage(
        name=state.quota.name,
        scope=_SCOPES[state.quota.per],
        subject=state.subject,
        used=state.used,
        limit=state.quota.limit,
        remaining=state.remaining,
        reset_time=wire.timestamp(state.reset_time),
    )


def _step(step: Step) -> Any:
    return policy_pb2.TraceStep(
        kind=step.kind.value,
        name=step.name,
        actions_matched=bool(step.actions_matched),
        roles_matched=_OUTCOMES[step.roles_matched],
        condition=_OUTCOMES[step.condition],
        effect=_EFFECTS[step.effect] if step.effect is not None else policy_pb2.EFFECT_UNSPECIFIED,
        detail=step.detail,
    )
