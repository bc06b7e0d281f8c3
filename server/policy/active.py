"""The hot path's in-process state: each tenant's active compiled bundle and recent decisions.

`ActiveBundles` keeps, per tenant, the compiled active version (or the fact that there is
none), loaded from the store on first use and dropped when any process activates or rolls
back a version: the activating process publishes the tenant on `CHANNEL` and every process's
`follow()` task drops its copy. Lost messages are bounded by `bundle_cache_ttl` (entries older
than that are reloaded) and a broken subscription drops everything before resubscribing.

`DecisionCache` is a bounded LRU of engine decisions keyed by the deciding versions and every
input the engine sees, so a cached decision is the decision; it is cleared on activation too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

from server.cache import Cache, CacheUnavailable
from server.errors import InvalidArgument, Unavailable
from server.policy import engine
from server.policy.engine import CompiledBundle
from server.policy.model import Decision, StoredBundle

CHANNEL = "policy:activated"
_COMPILED_KEPT = 256

_log = logging.getLogger("trustplane.policy")


class ActiveBundleUnusable(Unavailable):
    default_message = "the tenant's active policy cannot be loaded; an administrator must act"


class BundleSource(Protocol):
    """Where active versions come from (PgPolicyStore)."""

    async def active(self, tenant_id: str) -> StoredBundle | None: ...


class DecisionCache:
    """A bounded LRU of decisions with a time to live; size 0 disables it."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic):
        self._size = size
        self._ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, Decision]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self._size > 0

    def get(self, key: Hashable) -> Decision | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= self._clock():
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: Hashable, decision: Decision) -> None:
        if not self._size:
            return
        self._entries[key] = (self._clock() + self._ttl, decision)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def stats(self) -> dict[str, float]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._entries)}


@dataclass(frozen=True)
class _Loaded:
    bundle: CompiledBundle | None
    loaded_at: float


class ActiveBundles:
    """Each tenant's compiled active version, shared by the authorizer and the service."""

    def __init__(
        self,
        source: BundleSource,
        cache: Cache,
        decisions: DecisionCache,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._cache = cache
        self.decisions = decisions
        self._ttl = ttl
        self._clock = clock
        self._tenants: dict[str, _Loaded] = {}
        self._compiled: OrderedDict[str, CompiledBundle] = OrderedDict()
        self._loading: dict[str, asyncio.Task[CompiledBundle | None]] = {}
        self._generation = 0

    async def get(self, tenant_id: str) -> CompiledBundle | None:
        """The tenant's active compiled bundle, or None when it never activated one."""
        loaded = self._tenants.get(tenant_id)
        if loaded is not None and self._clock() - loaded.loaded_at < self._ttl:
            return loaded.bundle
        # One load per tenant at a time, in a task of its own so that a caller's cancellation
        # does not cancel it for the others waiting on it.
        task = self._loading.get(tenant_id)
        if task is None:
            task = asyncio.create_task(self._load(tenant_id), name="policy-load")
            self._loading[tenant_id] = task
            task.add_done_callback(lambda done: self._loaded(tenant_id, done))
        return await asyncio.shield(task)

    def _loaded(self, tenant_id: str, task: asyncio.Task[CompiledBundle | None]) -> None:
        if self._loading.get(tenant_id) is task:
            del self._loading[tenant_id]
        if not task.cancelled():
            task.exception()  # mark retrieved: the waiters (if any) re-raise it

    async def _load(self, tenant_id: str) -> CompiledBundle | None:
        generation = self._generation
        started = self._clock()
        stored = await self._source.active(tenant_id)
        bundle = None if stored is None else self.compiled(stored.version_id, stored.source)
        if generation == self._generation:  # no invalidation raced with the read
            self._tenants[tenant_id] = _Loaded(bundle, started)
        return bundle

    def compiled(self, version_id: str, source: str) -> CompiledBundle:
        """A stored version compiled (versions are immutable, so compiled once per process)."""
        bundle = self._compiled.get(version_id)
        if bundle is None:
            try:
                bundle = engine.parse_bundle(source)
            except InvalidArgument:
                # Validated when it was put; only a server whose engine changed since can get
                # here. Fail closed, without showing callers the policy's problems.
                _log.error(
                    "stored policy version no longer compiles", extra={"version": version_id}
                )
                raise ActiveBundleUnusable() from None
            self._compiled[version_id] = bundle
            while len(self._compiled) > _COMPILED_KEPT:
                self._compiled.popitem(last=False)
        return bundle

    def invalidate(self, tenant_id: str | None = None) -> None:
        """Drop one tenant's active version (None: every tenant's) and all cached decisions."""
        self._generation += 1
        if tenant_id is None:
            self._tenants.clear()
        else:
            self._tenants.pop(tenant_id, None)
        self.decisions.clear()

    async def announce(self, tenant_id: str) -> None:
        """After an activation: drop the local copy now and tell every other process."""
        self.invalidate(tenant_id)
        try:
            await self._cache.publish(CHANNEL, tenant_id.encode())
        except CacheUnavailable:
            # Other processes fall back on bundle_cache_ttl; the activation itself stands.
            _log.warning("policy activation not announced; peers refresh within the TTL")

    async def follow(self) -> None:
        """Apply other processes' announcements until cancelled; resubscribe on failure."""
        while True:
            try:
                async with self._cache.subscribe(CHANNEL) as subscription:
                    self.invalidate()  # anything missed before this subscription is dropped
                    async for _, message in subscription:
                        self.invalidate(message.decode())
            except CacheUnavailable:
                _log.warning("policy invalidation subscription lost; resubscribing")
            self.invalidate()
            await asyncio.sleep(1.0)
