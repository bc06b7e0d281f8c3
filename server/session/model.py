"""Session domain types (stdlib only): agent sessions, tasks, approvals and their lifecycles."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class SessionState(enum.Enum):
    PENDING = "PENDING"
    ACTIVE = "ACTIVE"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self not in _LIVE


_LIVE = frozenset({SessionState.PENDING, SessionState.ACTIVE})
LIVE_SESSION_STATES = tuple(sorted(s.value for s in _LIVE))

# The whole state machine: target state -> the states it may be reached from. EXPIRED is
# reached only through expiry (lazily on read and by the sweeper), never by a caller.
SESSION_TRANSITIONS: dict[SessionState, tuple[SessionState, ...]] = {
    SessionState.ACTIVE: (SessionState.PENDING,),
    SessionState.COMPLETED: (SessionState.ACTIVE,),
    SessionState.FAILED: (SessionState.ACTIVE,),
    SessionState.EXPIRED: (SessionState.PENDING, SessionState.ACTIVE),
    SessionState.CANCELLED: (SessionState.PENDING, SessionState.ACTIVE),
}


class TaskState(enum.Enum):
    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TASK_TRANSITIONS: dict[TaskState, tuple[TaskState, ...]] = {
    TaskState.IN_PROGRESS: (TaskState.PENDING,),
    TaskState.COMPLETED: (TaskState.IN_PROGRESS,),
    TaskState.FAILED: (TaskState.IN_PROGRESS,),
    TaskState.CANCELLED: (TaskState.PENDING, TaskState.IN_PROGRESS),
}


class ApprovalState(enum.Enum):
    PENDING = "PENDING"
    APPROVED = "APPROVED"
    DENIED = "DENIED"
    EXPIRED = "EXPIRED"


def etag_of(resource_id: str, revision: int) -> str:
    return f'"{resource_id[:8]}-{revision}"'


@dataclass(frozen=True)
class AgentSession:
    id: str
    tenant_id: str
    agent_id: str
    user_id: str | None
    role: str
    parent_session_id: str | None
    task: str
    metadata: dict[str, Any]
    labels: tuple[str, ...]
    state: SessionState
    end_reason: str
    created_by: str
    created_at: float
    updated_at: float
    started_at: float | None
    ended_at: float | None
    expires_at: float
    revision: int

    @property
    def etag(self) -> str:
        return etag_of(self.id, self.revision)


@dataclass(frozen=True)
class NewSession:
    """What CreateSession asks for, once validated."""

    tenant_id: str
    agent_id: str
    user_id: str | None
    role: str
    parent_session_id: str | None
    task: str
    metadata: dict[str, Any]
    labels: tuple[str, ...]
    created_by: str
    created_at: float
    expires_at: float
    request_id: str


@dataclass(frozen=True)
class SessionFilter:
    state: SessionState | None = None
    agent_id: str = ""
    user_id: str = ""
    created_after: float | None = None
    created_before: float | None = None


@dataclass(frozen=True)
class Task:
    id: str
    tenant_id: str
    session_id: str
    type: str
    from_role: str
    to_role: str
    payload: dict[str, Any]
    trace_id: str
    state: TaskState
    status_message: str
    created_by: str
    created_at: float
    updated_at: float
    revision: int

    @property
    def etag(self) -> str:
        return etag_of(self.id, self.revision)


@dataclass(frozen=True)
class NewTask:
    tenant_id: str
    session_id: str
    type: str
    from_role: str
    to_role: str
    payload: dict[str, Any]
    trace_id: str
    created_by: str
    created_at: float
    request_id: str


@dataclass(frozen=True)
class Approval:
    id: str
    tenant_id: str
    session_id: str | None
    requester_id: str
    requester_chain: tuple[str, ...]
    action_digest: bytes
    action: str
    reason: str
    approver_roles: tuple[str, ...]
    state: ApprovalState
    decided_by: str | None
    decision_note: str
    created_at: float
    decided_at: float | None
    expires_at: float
    redeemed_at: float | None
    revision: int


@dataclass(frozen=True)
class NewApproval:
    tenant_id: str
    session_id: str | None
    requester_id: str
    requester_chain: tuple[str, ...]
    action_digest: bytes
    action: str
    reason: str
    approver_roles: tuple[str, ...]
    created_at: float
    expires_at: float
    request_id: str


@dataclass(frozen=True)
class ApprovalFilter:
    state: ApprovalState | None = None
    session_id: str = ""
    # Only PENDING approvals decidable by a caller with these roles and this chain.
    approver_roles: tuple[str, ...] | None = None
    not_requested_by: tuple[str, ...] = field(default_factory=tuple)
