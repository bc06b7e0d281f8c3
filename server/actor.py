"""Who is calling: the `ActorContext` the authenticate layer puts in the call state.

Every later layer and every handler reads it; none of them looks at credentials again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property


class PrincipalType(enum.Enum):
    USER = "user"
    AGENT = "agent"
    SERVICE_ACCOUNT = "service_account"


class AuthMethod(enum.Enum):
    JWT = "jwt"
    API_KEY = "api_key"


@dataclass(frozen=True)
class DelegateActor:
    """One link of an RFC 8693 `act` chain: an identity acting for the one before it."""

    subject: str
    subject_type: PrincipalType = PrincipalType.AGENT


@dataclass(frozen=True)
class ActorContext:
    """The authenticated caller.

    `subject` is the principal the call is *for* (JWT `sub`); `act` is the delegation chain in
    RFC 8693 order: the current actor first (the outermost `act` claim), then the prior actors
    it acts through (nested `act` claims). For user → agent → sub-agent that is
    (sub-agent, agent). `scopes` is None when the credential carries no scope restriction.
    `session_id` is the auth session (`sid`), `agent_session_id` the agent session (`asid`);
    revoking either revokes the token. `derived_from` names the credentials a delegated token
    was exchanged from (token ids and API key ids, its `derived_from` claim); revoking any of
    them revokes the token too.
    """

    tenant_id: str
    subject: str
    subject_type: PrincipalType
    auth_method: AuthMethod
    roles: frozenset[str] = frozenset()
    scopes: frozenset[str] | None = None
    act: tuple[DelegateActor, ...] = ()
    session_id: str | None = None
    # The agent session (Session service) a delegated token acts within: its `asid` claim.
    agent_session_id: str | None = None
    token_id: str | None = None
    issuer: str = ""
    issued_at: float = 0.0
    expires_at: float = 0.0
    # Ids of the credentials (tokens' `jti`, API key ids) a delegated token was exchanged from.
    derived_from: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def actor_id(self) -> str:
        """The identity actually making the call: the current actor, else the subject."""
        return self.act[0].subject if self.act else self.subject

    @cached_property
    def actors(self) -> tuple[str, ...]:
        """The ids of the `act` chain, current actor first (the subject not included); worked
        out once per context (the credential caches hand out one per credential)."""
        return tuple(link.subject for link in self.act)

    @property
    def chain(self) -> tuple[str, ...]:
        """Every principal in the call, subject first: all must be allowed (delegation)."""
        return (self.subject, *self.actors)
