"""The built-in authorization table: which tenant roles grant which permissions.

Permissions are named `<resource>.<verb>` (`sessions.create`, `crypto.keys.use`), declared per
RPC in the contract. A grant is a pattern: an exact permission, `<prefix>.*` (everything under
a resource), `*.<verb>` (a verb on every resource) or `*`. Token scopes use the same patterns
and can only narrow what the roles grant. This table is the platform bundle of the policy engine
(`server.policy.engine.platform_bundle`); the server's authorizer is
`server.policy.authorizer.PolicyAuthorizer`, where tenant bundles can restrict it further.
`RolePermissions` remains for wiring without a database (unit tests).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from server.actor import ActorContext

_READ = ("*.get", "*.list", "*.read", "*.watch", "auth.whoami", "auth.self.*")
_WRITE = ("*.create", "*.update", "*.write", "*.use", "*.append", "*.check", "*.request")
_ADMIN = (
    "*.delete",
    "*.manage",
    "*.admin",
    "*.revoke",
    "*.rotate",
    "*.explain",
    "*.approve",
    "*.check_others",
)

ROLE_GRANTS: dict[str, tuple[str, ...]] = {
    "viewer": _READ,
    "member": _READ + _WRITE,
    "admin": _READ + _WRITE + _ADMIN,
    "owner": ("*",),
}


def matches(pattern: str, permission: str) -> bool:
    """Does `pattern` grant `permission`?"""
    if pattern in ("*", permission):
        return True
    if pattern.startswith("*."):
        return permission.endswith(pattern[1:])
    if pattern.endswith(".*"):
        return permission.startswith(pattern[:-1])
    return False


def any_matches(patterns: Iterable[str], permission: str) -> bool:
    return any(matches(pattern, permission) for pattern in patterns)


@dataclass(frozen=True)
class Decision:
    """`audit`: the decision as one line for the call's audit entry (decision id, effect,
    deciding version, rule or cause, permission), when the authorizer records one."""

    allowed: bool
    reason: str = ""
    audit: str = ""


class RolePermissions:
    """Allowed iff one of the caller's roles grants the permission and, when the credential
    carries scopes, one of its scopes does too."""

    def __init__(self, grants: dict[str, tuple[str, ...]] | None = None) -> None:
        self._grants = ROLE_GRANTS if grants is None else grants

    async def decide(self, actor: ActorContext, permission: str) -> Decision:
        granted = any(any_matches(self._grants.get(role, ()), permission) for role in actor.roles)
        if not granted:
            return Decision(False, "no role of the caller grants it")
        if actor.scopes is not None and not any_matches(actor.scopes, permission):
            return Decision(False, "the credential's scopes do not include it")
        return Decision(True)
