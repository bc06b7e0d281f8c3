"""SessionService gRPC adapter: decode the request, make one SessionManager call, encode."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2
from trustplane.session.v1 import session_pb2, session_pb2_grpc

from server import call_state, wire
from server.actor import ActorContext
from server.errors import FieldViolation, InvalidArgument
from server.session.model import (
    AgentSession,
    Approval,
    ApprovalState,
    SessionFilter,
    SessionState,
    Task,
    TaskState,
)
from server.session.service import SessionManager

_SESSION_STATES = {
    s: session_pb2.SessionState.Value(f"SESSION_STATE_{s.value}") for s in SessionState
}
_SESSION_STATES_IN = {v: k for k, v in _SESSION_STATES.items()}
_TASK_STATES = {s: session_pb2.TaskState.Value(f"TASK_STATE_{s.value}") for s in TaskState}
_TASK_STATES_IN = {v: k for k, v in _TASK_STATES.items()}
_APPROVAL_STATES = {
    s: session_pb2.ApprovalState.Value(f"APPROVAL_STATE_{s.value}") for s in ApprovalState
}
_APPROVAL_STATES_IN = {v: k for k, v in _APPROVAL_STATES.items()}
_UPDATABLE = ("labels", "metadata")
T = TypeVar("T")


def _actor() -> ActorContext:
    return call_state.current().require_actor()


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, sessions: SessionManager) -> None:
        self._sessions = sessions

    # --- sessions ---------------------------------------------------------------------------

    async def CreateSession(self, request: Any, context: Any) -> Any:
        session = await self._sessions.create_session(
            _actor(),
            agent_id=request.agent_id,
            role=request.role,
            parent_session_id=request.parent_session_id,
            task=request.task,
            metadata=_struct(request, "metadata"),
            labels=list(request.labels),
            ttl=_duration(request, "ttl"),
            request_id=request.request_id,
        )
        return session_pb2.CreateSessionResponse(session=encode_session(session))

    async def GetSession(self, request: Any, context: Any) -> Any:
        session = await self._sessions.get_session(_actor(), request.session_id)
        return self._sessions.answer_for(session, _get_session_response)

    async def ListSessions(self, request: Any, context: Any) -> Any:
        where = SessionFilter(
            state=_state(_SESSION_STATES_IN, request.state),
            agent_id=request.agent_id,
            user_id=request.user_id,
            created_after=_seconds(request, "created_after"),
            created_before=_seconds(request, "created_before"),
        )
        found, token = await self._sessions.list_sessions(
            _actor(), where, request.page_size, request.page_token
        )
        return session_pb2.ListSessionsResponse(
            sessions=[encode_session(s) for s in found], next_page_token=token
        )

    async def UpdateSession(self, request: Any, context: Any) -> Any:
        paths = set(request.update_mask.paths)
        if not paths or not paths <= set(_UPDATABLE):
            raise InvalidArgument.fields(
                FieldViolation("update_mask", f"must name some of: {', '.join(_UPDATABLE)}")
            )
        session = await self._sessions.update_session(
            _actor(),
            request.session.session_id,
            metadata=_struct(request.session, "metadata") if "metadata" in paths else None,
            labels=list(request.session.labels) if "labels" in paths else None,
            etag=request.session.etag,
        )
        return session_pb2.UpdateSessionResponse(session=encode_session(session))

    async def AddSessionLabels(self, request: Any, context: Any) -> Any:
        session = await self._sessions.add_labels(
            _actor(), request.session_id, list(request.labels)
        )
        return session_pb2.AddSessionLabelsResponse(session=encode_session(session))

    async def StartSession(self, request: Any, context: Any) -> Any:
        session = await self._sessions.transition(
            _actor(), request.session_id, SessionState.ACTIVE, etag=request.etag
        )
        return session_pb2.StartSessionResponse(session=encode_session(session))

    async def CompleteSession(self, request: Any, context: Any) -> Any:
        session = await self._sessions.transition(
            _actor(), request.session_id, SessionState.COMPLETED, etag=request.etag
        )
        return session_pb2.CompleteSessionResponse(session=encode_session(session))

    async def FailSession(self, request: Any, context: Any) -> Any:
        session = await self._sessions.transition(
            _actor(),
            request.session_id,
            SessionState.FAILED,
            etag=request.etag,
            reason=request.reason,
        )
        return session_pb2.FailSessionResponse(session=encode_session(session))

    async def CancelSession(self, request: Any, context: Any) -> Any:
        session = await self._sessions.transition(
            _actor(),
            request.session_id,
            SessionState.CANCELLED,
            etag=request.etag,
            reason=request.reason,
        )
        return session_pb2.CancelSessionResponse(session=encode_session(session))

    async def WatchSession(self, request: Any, context: Any) -> AsyncIterator[Any]:
        changes = self._sessions.watch_session(_actor(), request.session_id, request.after_revision)
        async for session in changes:
            yield session_pb2.WatchSessionResponse(session=encode_session(session))

    # --- tasks ------------------------------------------------------------------------------

    async def CreateTask(self, request: Any, context: Any) -> Any:
        task = await self._sessions.create_task(
            _actor(),
            session_id=request.session_id,
            type=request.type,
            from_role=request.from_role,
            to_role=request.to_role,
            payload=_struct(request, "payload"),
            trace_id=request.trace_id,
            request_id=request.request_id,
        )
        return session_pb2.CreateTaskResponse(task=encode_task(task))

    async def GetTask(self, request: Any, context: Any) -> Any:
        task = await self._sessions.get_task(_actor(), request.task_id)
        return session_pb2.GetTaskResponse(task=encode_task(task))

    async def ListTasks(self, request: Any, context: Any) -> Any:
        found, token = await self._sessions.list_tasks(
            _actor(),
            request.session_id,
            _state(_TASK_STATES_IN, request.state),
            request.to_role,
            request.page_size,
            request.page_token,
        )
        return session_pb2.ListTasksResponse(
            tasks=[encode_task(t) for t in found], next_page_token=token
        )

    async def UpdateTaskState(self, request: Any, context: Any) -> Any:
        target = _state(_TASK_STATES_IN, request.state)
        if target is None:
            raise InvalidArgument.fields(FieldViolation("state", "required"))
        task = await self._sessions.update_task_state(
            _actor(), request.task_id, target, request.status_message, request.etag
        )
        return session_pb2.UpdateTaskStateResponse(task=encode_task(task))

    # --- approvals --------------------------------------------------------------------------

    async def RequestApproval(self, request: Any, context: Any) -> Any:
        approval = await self._sessions.request_approval(
            _actor(),
            session_id=request.session_id,
            digest=request.action_digest,
            action=request.action,
            reason=request.reason,
            approver_roles=list(request.approver_roles),
            ttl=_duration(request, "ttl"),
            request_id=request.request_id,
        )
        return session_pb2.RequestApprovalResponse(approval=encode_approval(approval))

    async def GetApproval(self, request: Any, context: Any) -> Any:
        approval = await self._sessions.get_approval(_actor(), request.approval_id)
        return session_pb2.GetApprovalResponse(approval=encode_approval(approval))

    async def ListApprovals(self, request: Any, context: Any) -> Any:
        found, token = await self._sessions.list_approvals(
            _actor(),
            _state(_APPROVAL_STATES_IN, request.state),
            request.session_id,
            request.awaiting_me,
            request.page_size,
            request.page_token,
        )
        return session_pb2.ListApprovalsResponse(
            approvals=[encode_approval(a) for a in found], next_page_token=token
        )

    async def ApproveApproval(self, request: Any, context: Any) -> Any:
        approval, token = await self._sessions.approve(_actor(), request.approval_id, request.note)
        return session_pb2.ApproveApprovalResponse(
            approval=encode_approval(approval), approval_token=token
        )

    async def DenyApproval(self, request: Any, context: Any) -> Any:
        approval = await self._sessions.deny(_actor(), request.approval_id, request.note)
        return session_pb2.DenyApprovalResponse(approval=encode_approval(approval))

    async def RedeemApproval(self, request: Any, context: Any) -> Any:
        actor = _actor()
        approval = await self._sessions.redeem_approval(
            actor.tenant_id,
            request.approval_token,
            digest=request.action_digest,
            principal_id=actor.actor_id,
            session_id=request.session_id or None,
        )
        return session_pb2.RedeemApprovalResponse(approval=encode_approval(approval))

    async def WatchApproval(self, request: Any, context: Any) -> AsyncIterator[Any]:
        async for approval in self._sessions.watch_approval(_actor(), request.approval_id):
            yield session_pb2.WatchApprovalResponse(approval=encode_approval(approval))


# --- encoding -----------------------------------------------------------------------------


def _state(states: Mapping[Any, T], value: int) -> T | None:
    """An enum field: unspecified is None, a number the contract does not define is invalid."""
    if value == 0:
        return None
    if value not in states:
        raise InvalidArgument.fields(FieldViolation("state", "not a known state"))
    return states[value]


def _struct(message: Any, field: str) -> dict[str, Any]:
    """A Struct field as a dict; NaN and infinities have no JSON form: INVALID_ARGUMENT."""
    if not message.HasField(field):
        return {}
    try:
        return dict(json_format.MessageToDict(getattr(message, field)))
    except ValueError:
        raise InvalidArgument.fields(FieldViolation(field, "numbers must be finite")) from None


def _to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def _duration(message: Any, field: str) -> float | None:
    return _seconds(message, field)


def _seconds(message: Any, field: str) -> float | None:
    """A Timestamp or Duration field as seconds (None when unset); one outside the type's
    range is INVALID_ARGUMENT."""
    try:
        return wire.seconds(message, field)
    except ValueError:
        raise InvalidArgument.fields(FieldViolation(field, "out of range")) from None


def _get_session_response(session: AgentSession) -> session_pb2.GetSessionResponse:
    return session_pb2.GetSessionResponse(session=encode_session(session))


def encode_session(session: AgentSession) -> session_pb2.AgentSession:
    return session_pb2.AgentSession(
        session_id=session.id,
        agent_id=session.agent_id,
        user_id=session.user_id or "",
        role=session.role,
        parent_session_id=session.parent_session_id or "",
        task=session.task,
        metadata=_to_struct(session.metadata),
        labels=list(session.labels),
        state=_SESSION_STATES[session.state],
        end_reason=session.end_reason,
        create_time=wire.timestamp(session.created_at),
        update_time=wire.timestamp(session.updated_at),
        start_time=wire.timestamp(session.started_at),
        end_time=wire.timestamp(session.ended_at),
        expire_time=wire.timestamp(session.expires_at),
        revision=session.revision,
        etag=session.etag,
    )


def encode_task(task: Task) -> session_pb2.Task:
    return session_pb2.Task(
        task_id=task.id,
        session_id=task.session_id,
        type=task.type,
        from_role=task.from_role,
        to_role=task.to_role,
        payload=_to_struct(task.payload),
        trace_id=task.trace_id,
        state=_TASK_STATES[task.state],
        status_message=task.status_message,
        created_by=task.created_by,
        create_time=wire.timestamp(task.created_at),
        update_time=wire.timestamp(task.updated_at),
        etag=task.etag,
    )


def encode_approval(approval: Approval) -> session_pb2.Approval:
    return session_pb2.Approval(
        approval_id=approval.id,
        session_id=approval.session_id or "",
        requester_id=approval.requester_id,
        action_digest=approval.action_digest,
        action=approval.action,
        reason=approval.reason,
        approver_roles=list(approval.approver_roles),
        state=_APPROVAL_STATES[approval.state],
        decided_by=approval.decided_by or "",
        decision_note=approval.decision_note,
        create_time=wire.timestamp(approval.created_at),
        decide_time=wire.timestamp(approval.decided_at),
        expire_time=wire.timestamp(approval.expires_at),
        redeem_time=wire.timestamp(approval.redeemed_at),
        revision=approval.revision,
    )
