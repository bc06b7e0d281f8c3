"""Layer 6: may this caller invoke this method — its declared `permission`, decided by an
`Authorizer`. Denial is PERMISSION_DENIED naming the missing permission (metadata
`permission`). A decision's audit line (its decision id, …) becomes the call's audit attribute
`authorization`. Public methods pass; every other method declares a permission, which
`MethodRegistry.require_permissions` enforces at start-up."""

from __future__ import annotations

from typing import Any, Protocol

from interceptors.chain import Call, Context
from server import call_state
from server.actor import ActorContext
from server.errors import PermissionDenied
from server.methods import MethodSpec
from server.permissions import Decision


class Authorizer(Protocol):
    """Decides one permission for one caller (built in: RolePermissions; later: Policy)."""

    async def decide(self, actor: ActorContext, permission: str) -> Decision: ...


class AuthorizeLayer:
    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    def wrap(self, method: MethodSpec, call: Call) -> Call:
        if method.public:
            return call
        permission = method.permission
        decide = self._authorizer.decide

        async def authorized(request: Any, context: Context) -> Any:
            state = call_state.current()
            decision = await decide(state.require_actor(), permission)
            if decision.audit:  # into the call's own audit entry, written as it always is
                state.audit_attributes["authorization"] = decision.audit
            if not decision.allowed:
                raise PermissionDenied(
                    f"permission {permission} denied: {decision.reason}",
                    metadata={"permission": permission},
                )
            return await call(request, context)

        return authorized
