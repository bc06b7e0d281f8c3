"""Per-call state shared by the interceptor layers and handlers, held in a ContextVar.

The outermost layer creates one `CallState` per RPC inside the wrapped behaviour (each RPC runs
in its own asyncio task, so the variable never leaks between calls). Later layers fill it in:
who the caller is, the outcome, whether the response was replayed.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import grpc

from server.actor import ActorContext
from server.methods import MethodSpec


@dataclass
class CallState:
    """Everything a call accumulates on its way through the chain."""

    method: MethodSpec
    started: float
    request_id: str = ""
    code: grpc.StatusCode = grpc.StatusCode.OK
    reason: str = ""
    replayed: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    actor: ActorContext | None = None
    idempotency_key: str = ""
    # Facts a handler adds to the call's own audit entry (e.g. Check's decisions); short
    # strings, never request bodies or secrets.
    audit_attributes: dict[str, str] = field(default_factory=dict)

    def require_actor(self) -> ActorContext:
        """The authenticated caller; only non-public methods are guaranteed to have one."""
        if self.actor is None:
            raise LookupError("call is not authenticated")
        return self.actor


_current: contextvars.ContextVar[CallState | None] = contextvars.ContextVar(
    "trustplane_call_state", default=None
)


def current() -> CallState:
    """The state of the call being handled; only valid inside the interceptor chain."""
    state = _current.get()
    if state is None:
        raise LookupError("no call in progress")
    return state


def bind(state: CallState) -> contextvars.Token[CallState | None]:
    return _current.set(state)


def unbind(token: contextvars.Token[CallState | None]) -> None:
    _current.reset(token)
