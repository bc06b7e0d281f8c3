"""Layer 5: requests per (tenant, principal, actor), a GCRA token bucket in the cache backend.

Default 100 requests per minute with a burst of 50 (TRUSTPLANE_RATE_LIMIT / _BURST; 0
disables). Over the limit: RESOURCE_EXHAUSTED, reason RATE_LIMITED, with `RetryInfo` (when the
next request will be admitted) and `QuotaFailure` (which bucket). The bucket is keyed by the
actor as well as the principal, so one runaway agent acting for a user cannot starve the
user's other agents.

Failure mode: fail open. If the cache is unreachable the call proceeds (and
`trustplane_rate_limit_unavailable_total` counts it): the limiter protects capacity, and
refusing every authenticated call because Redis blinked would turn a cache outage into a full
outage. Authentication and authorization still fail closed.
"""

from __future__ import annotations

import logging
from typing import Any

import prometheus_client as prom

from interceptors.chain import Call, Context
from server import call_state
from server.cache import Cache, CacheUnavailable
from server.config import RateLimitConfig
from server.errors import QuotaViolation, ResourceExhausted
from server.methods import MethodSpec

_log = logging.getLogger("trustplane.rate_limit")


class RateLimitLayer:
    def __init__(
        self, cache: Cache, config: RateLimitConfig, registry: prom.CollectorRegistry
    ) -> None:
        self._cache = cache
        self._config = config
        self._rate = config.per_minute / 60.0
        self._unavailable = prom.Counter(
            "trustplane_rate_limit_unavailable",
            "Calls admitted because the cache was down.",
            registry=registry,
        )

    def wrap(self, method: MethodSpec, call: Call) -> Call:
        if method.public or self._config.per_minute == 0:
            return call
        admit = self._admit

        async def limited(request: Any, context: Context) -> Any:
            await admit()
            return await call(request, context)

        return limited

    async def _admit(self) -> None:
        actor = call_state.current().require_actor()
        bucket = f"{actor.tenant_id}/{actor.subject}/{actor.actor_id}"
        try:
            allowed, retry_after = await self._cache.throttle(
                f"rl:{bucket}", self._rate, self._config.burst
            )
        except CacheUnavailable:
            self._unavailable.inc()
            _log.warning("rate limiter unavailable; admitting the call")
            return
        if not allowed:
            raise ResourceExhausted(
                f"rate limit of {self._config.per_minute} requests per minute exceeded",
                retry_after=retry_after,
                quota_violations=[
                    QuotaViolation(
                        f"principal:{bucket}", f"{self._config.per_minute} requests per minute"
                    )
                ],
            )
