"""Principals as authorization sees them: type, roles, attributes and whether they may act.

A token names the principals of a call (its subject and the `act` chain) but carries the roles
of the subject only. Policy decisions need the roles and attributes of every principal in the
chain, and must notice the kill switch (a disabled agent) and role changes, so they ask this
directory instead of trusting what a token said when it was issued.

Reads go to the Auth store, one query for the principals a call names (shared by the calls
that miss at the same time), and are kept in a
bounded in-process cache for `ttl` seconds (0: no cache) — the bound on how long a role change
or a disabled agent takes to reach decisions in a process. Principals the store does not know
(e.g. an external issuer's agents) are remembered as unknown for as long.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from server.auth.model import Principal


class PrincipalStore(Protocol):
    """Where principals are read (PgAuthStore)."""

    async def principals(self, tenant_id: str, principal_ids: Sequence[str]) -> list[Principal]: ...


@dataclass(frozen=True)
class PrincipalFacts:
    """A stored principal, for authorization. `disabled` is also true once an agent's
    `expire_time` has passed. `attributes` (`principal.attr` in policy conditions): `purpose`,
    `display_name`, `mfa_enabled`, and when set `owner_id` and `scopes`."""

    id: str
    type: str
    roles: frozenset[str]
    disabled: bool
    attributes: Mapping[str, object] = field(default_factory=dict, hash=False)


class PrincipalDirectory:
    """See the module docstring."""

    def __init__(
        self,
        store: PrincipalStore,
        *,
        ttl: float,
        size: int = 10_000,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = ttl
        self._size = size
        self._clock = clock
        self._monotonic = monotonic
        self._entries: OrderedDict[tuple[str, str], tuple[float, PrincipalFacts | None]] = (
            OrderedDict()
        )
        self._reading: dict[tuple[str, tuple[str, ...]], asyncio.Task[dict[str, PrincipalFacts]]]
        self._reading = {}

    async def principals(
        self, tenant_id: str, principal_ids: Collection[str]
    ) -> dict[str, PrincipalFacts]:
        """The tenant's principals among `principal_ids` that the store knows, by id."""
        now = self._monotonic()
        found: dict[str, PrincipalFacts] = {}
        missing: list[str] = []
        for principal_id in dict.fromkeys(principal_ids):
            entry = self._entries.get((tenant_id, principal_id))
            if entry is None or entry[0] <= now:
                missing.append(principal_id)
            elif entry[1] is not None:
                found[principal_id] = entry[1]
        if missing:
            found.update(await self._read(tenant_id, tuple(missing), now))
        return found

    async def _read(
        self, tenant_id: str, missing: tuple[str, ...], now: float
    ) -> dict[str, PrincipalFacts]:
        """One store read per set of ids at a time: callers that miss together share it."""
        key = (tenant_id, missing)
        task = self._reading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(tenant_id, missing, now))
            self._reading[key] = task
            task.add_done_callback(lambda done: self._landed(key, done))
        return await asyncio.shield(task)

    async def _load(
        self, tenant_id: str, missing: tuple[str, ...], now: float
    ) -> dict[str, PrincipalFacts]:
        read = {p.id: self._facts(p) for p in await self._store.principals(tenant_id, missing)}
        if self._ttl > 0:
            for principal_id in missing:
                self._keep((tenant_id, principal_id), now + self._ttl, read.get(principal_id))
        return read

    def _landed(
        self, key: tuple[str, tuple[str, ...]], task: asyncio.Task[dict[str, PrincipalFacts]]
    ) -> None:
        if self._reading.get(key) is task:
            del self._reading[key]
        if not task.cancelled():
            task.exception()  # retrieved: the waiters re-raise it

    def _keep(self, key: tuple[str, str], until: float, facts: PrincipalFacts | None) -> None:
        self._entries[key] = (until, facts)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def _facts(self, principal: Principal) -> PrincipalFacts:
        attributes: dict[str, object] = {
            "purpose": principal.purpose,
            "display_name": principal.display_name,
            "mfa_enabled": principal.mfa_enabled,
        }
        if principal.owner_id:
            attributes["owner_id"] = principal.owner_id
        if principal.scopes is not None:
            attributes["scopes"] = sorted(principal.scopes)
        expired = principal.expires_at is not None and principal.expires_at <= self._clock()
        return PrincipalFacts(
            id=principal.id,
            type=principal.type.value,
            roles=frozenset(principal.roles),
            disabled=principal.disabled or expired,
            attributes=attributes,
        )
