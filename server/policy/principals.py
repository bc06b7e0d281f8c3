"""The principals of a call, as decisions see them.

A credential names its subject (with the roles it was issued with) and the delegates of its
RFC 8693 `act` chain, but says nothing of a delegate's roles, and a delegate's roles may change
or the agent be switched off after the token was issued. So every principal of the chain is
looked up in a `PrincipalDirectory` (the Auth service's `server.auth.directory`, wired in
`server/app.py`): its stored roles and attributes, and whether it may act at all; so is the
subject, for its attributes (its roles are the credential's). A delegate the
directory does not know (an external issuer's agent) keeps the id and type the token gives it
and no roles: rules for it must match on `roles: ["*"]`, and the platform part of a suite
method's decision is left to the credential's scopes.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass
from typing import Protocol

from server.actor import ActorContext
from server.policy.model import Principal


class PrincipalRecord(Protocol):
    """A stored principal (the Auth service's `PrincipalFacts`)."""

    @property
    def type(self) -> str: ...
    @property
    def roles(self) -> frozenset[str]: ...
    @property
    def disabled(self) -> bool: ...
    @property
    def attributes(self) -> Mapping[str, object]: ...


class PrincipalDirectory(Protocol):
    """The tenant's stored principals among some ids (unknown ids are absent); cached briefly
    in-process, so role changes and the kill switch reach decisions within its TTL."""

    async def principals(
        self, tenant_id: str, principal_ids: Collection[str]
    ) -> Mapping[str, PrincipalRecord]: ...


@dataclass(frozen=True)
class CallPrincipals:
    """The subject and the delegates of a call. `known`: the ids the directory holds (their
    roles are real); `disabled`: the first principal of the chain that may not act."""

    subject: Principal
    delegates: tuple[Principal, ...]
    known: frozenset[str] = frozenset()
    disabled: str | None = None


async def call_principals(
    directory: PrincipalDirectory | None, actor: ActorContext, *, subject_attributes: bool
) -> CallPrincipals:
    """The caller's subject (roles and type from its credential; with `subject_attributes`,
    its stored attributes, and whether it may act) and its delegates, each with its stored
    roles and attributes. Nothing is looked up when there is nothing to look up."""
    chain = actor.actors
    wanted = (actor.subject, *chain) if subject_attributes else chain
    found: Mapping[str, PrincipalRecord] = {}
    if directory is not None and wanted:
        found = await directory.principals(actor.tenant_id, wanted)
    own = found.get(actor.subject) if subject_attributes else None
    attributes = dict(own.attributes) if own is not None else {}
    subject = Principal(
        actor.subject, actor.roles, attributes, actor.tenant_id, actor.subject_type.value, chain
    )
    delegates = tuple(
        _delegate(actor, link.subject, link.subject_type.value, found) for link in actor.act
    )
    disabled = next((p for p in wanted if _disabled(found, p)), None)
    return CallPrincipals(subject, delegates, frozenset(found) & frozenset(chain), disabled)


def _delegate(
    actor: ActorContext, principal_id: str, token_type: str, found: Mapping[str, PrincipalRecord]
) -> Principal:
    record = found.get(principal_id)
    if record is None:  # unknown here: the id and type its token gives, no roles
        return Principal(principal_id, frozenset(), {}, actor.tenant_id, token_type)
    attributes = dict(record.attributes)
    return Principal(principal_id, record.roles, attributes, actor.tenant_id, record.type)


def _disabled(found: Mapping[str, PrincipalRecord], principal_id: str) -> bool:
    record = found.get(principal_id)
    return record is not None and record.disabled


def frozen(value: object) -> Hashable:
    """A hashable, type-faithful form of an attribute value for cache keys (True, 1 and 1.0
    must not collide: CEL tells them apart)."""
    if isinstance(value, dict):
        return tuple(sorted((k, frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("[", *(frozen(v) for v in value))
    if isinstance(value, bool | float):
        return (type(value).__name__, value)
    if value is None or isinstance(value, int | str):
        return value
    return ("?", str(value))


def principal_key(p: Principal) -> Hashable:
    """Everything of a principal a decision can depend on, for cache keys."""
    return (p.id, p.roles, p.type, p.tenant, p.chain, frozen(p.attr) if p.attr else ())
