"""The revocation deny-list: revoked token ids, sessions (auth `sid` and agent `asid`, the
latter per tenant) and subjects, shared through the cache.

Tokens are verified offline (signature, claims), so revocation needs a shared list that every
server process consults. Entries live in the cache backend (Redis across processes) and expire
once no token they could match is still valid (`max_token_ttl`).

Staleness bound: a "not revoked" answer for a token is reused in-process for at most
`staleness` seconds (default 1 s), so the hot path is usually a dictionary lookup. Every
revocation is also published on the cache's pub/sub channel, and every process drops its
memo on receipt, so in practice a revocation takes effect on the next call everywhere; the
bound holds even if that message is lost.

Failure mode: fail closed. If the cache cannot be asked, the call fails `UNAVAILABLE`; a token
is never accepted because the deny-list was unreachable (a memo younger than the bound still
answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from server.actor import ActorContext
from server.cache import Cache, CacheUnavailable

_log = logging.getLogger("trustplane.revocation")
CHANNEL = "revocations"
_MEMO_LIMIT = 100_000


class RevocationList:
    """Revoke by token id (`jti`), auth session (`sid`), agent session (`asid`) or subject;
    check an `ActorContext`."""

    def __init__(
        self,
        cache: Cache,
        *,
        staleness: float,
        max_token_ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._cache = cache
        self._staleness = staleness
        self._ttl = max_token_ttl
        self._clock = clock
        self._memo: dict[tuple[str | None, str | None, str | None, str, str], float] = {}

    async def revoke_token(self, token_id: str) -> None:
        """A token (`jti`) or an API key (its id), and every delegated token exchanged from it
        (their `derived_from` claim names it)."""
        await self._revoke(f"rv:jti:{token_id}", b"1")

    async def revoke_session(self, session_id: str) -> None:
        """Every token derived from the session, delegated ones included."""
        await self._revoke(f"rv:sid:{session_id}", b"1")

    async def revoke_agent_session(self, tenant_id: str, agent_session_id: str) -> None:
        """Every delegated token of the tenant bound to the agent session (its `asid` claim).
        The entry is tenant-scoped, like the token's `tid`: the same id in another tenant's
        token is another session."""
        await self._revoke(_asid_key(tenant_id, agent_session_id), b"1")

    async def revoke_subject(self, tenant_id: str, subject: str) -> None:
        """Every token issued up to now in which `subject` takes part — as the token's subject
        or anywhere in its `act` chain (a kill switch); later ones are valid."""
        await self._revoke(f"rv:sub:{tenant_id}:{subject}", repr(self._clock()).encode())

    async def _revoke(self, key: str, value: bytes) -> None:
        await self._cache.set(key, value, ttl=self._ttl)
        self._memo.clear()
        await self._cache.publish(CHANNEL, key.encode())

    async def is_revoked(self, actor: ActorContext) -> bool:
        memo_key = (
            actor.token_id,
            actor.session_id,
            actor.agent_session_id,
            actor.tenant_id,
            actor.subject,
        )
        now = self._clock()
        checked = self._memo.get(memo_key)
        if checked is not None and now - checked < self._staleness:
            return False
        if await self._lookup(actor):
            return True
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[memo_key] = now
        return False

    async def _lookup(self, actor: ActorContext) -> bool:
        if actor.token_id and await self._cache.get(f"rv:jti:{actor.token_id}") is not None:
            return True
        if actor.session_id and await self._cache.get(f"rv:sid:{actor.session_id}") is not None:
            return True
        asid = actor.agent_session_id
        if asid and await self._cache.get(_asid_key(actor.tenant_id, asid)) is not None:
            return True
        for source in actor.derived_from:  # the credentials a delegated token came from
            if await self._cache.get(f"rv:jti:{source}") is not None:
                return True
        # The subject and every actor it acts through: disabling an agent (or a user) kills
        # each token it appears in, delegated ones included, however deep in the chain.
        for principal in actor.chain:
            revoked_at = await self._cache.get(f"rv:sub:{actor.tenant_id}:{principal}")
            if revoked_at is not None and actor.issued_at <= float(revoked_at):
                return True
        return False

    def forget(self) -> None:
        """Drop every memoised answer (a revocation happened somewhere)."""
        self._memo.clear()

    async def follow(self) -> None:
        """Drop the memo whenever any process revokes something; runs until cancelled."""
        while True:
            try:
                async with self._cache.subscribe(CHANNEL) as subscription:
                    self.forget()  # we may have missed messages while not subscribed
                    async for _channel, _message in subscription:
                        self.forget()
            except CacheUnavailable:
                raise_if_cancelled()
                _log.warning("revocation channel unavailable; retrying")
                self.forget()
                await asyncio.sleep(1.0)


def _asid_key(tenant_id: str, agent_session_id: str) -> str:
    return f"rv:asid:{tenant_id}:{agent_session_id}"


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a library turned into another error (redis-py can report
    a cancelled read as a connection error), so a follower loop never outlives its stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


async def stop_following(task: asyncio.Task[None]) -> None:
    """Cancel a background task and wait for it, cancelling again if it swallowed it."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    with contextlib.suppress(asyncio.CancelledError):
        await task
