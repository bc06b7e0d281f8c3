"""Rate-limit layer behaviour that needs a broken cache: it fails open."""

from __future__ import annotations

import time

import grpc
import prometheus_client as prom
import pytest

from interceptors.rate_limit import RateLimitLayer
from server import call_state
from server.actor import ActorContext, AuthMethod, PrincipalType
from server.cache import CacheUnavailable, MemoryCache
from server.config import RateLimitConfig
from server.errors import ResourceExhausted
from server.methods import AuditClass, Idempotency, MethodSpec


class _DownCache(MemoryCache):
    async def throttle(self, key, rate, burst, cost=1):
        raise CacheUnavailable()


SPEC = MethodSpec(
    "/x.Y/Z", "x.Y", "Z", "x.read", False, Idempotency.NONE, AuditClass.ACCESS, False, False
)


def _bind():
    state = call_state.CallState(method=SPEC, started=time.perf_counter())
    state.actor = ActorContext("t", "u", PrincipalType.USER, AuthMethod.JWT)
    return call_state.bind(state)


async def _handler(request, context):
    return "ran"


async def test_fails_open_and_counts_it():
    registry = prom.CollectorRegistry()
    layer = RateLimitLayer(_DownCache(), RateLimitConfig(per_minute=1, burst=1), registry)
    token = _bind()
    try:
        call = layer.wrap(SPEC, _handler)
        assert await call(None, None) == "ran"
        assert await call(None, None) == "ran"
    finally:
        call_state.unbind(token)
    assert registry.get_sample_value("trustplane_rate_limit_unavailable_total") == 2


async def test_limits_with_a_working_cache():
    clock = [0.0]
    layer = RateLimitLayer(
        MemoryCache(clock=lambda: clock[0]),
        RateLimitConfig(per_minute=60, burst=2),
        prom.CollectorRegistry(),
    )
    token = _bind()
    try:
        call = layer.wrap(SPEC, _handler)
        await call(None, None)
        await call(None, None)
        with pytest.raises(ResourceExhausted) as error:
            await call(None, None)
        assert error.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.value.retry_after == pytest.approx(1.0)
        clock[0] += 1.0
        assert await call(None, None) == "ran"
    finally:
        call_state.unbind(token)


def test_disabled_or_public_methods_are_not_wrapped():
    layer = RateLimitLayer(
        MemoryCache(), RateLimitConfig(per_minute=0, burst=1), prom.CollectorRegistry()
    )
    assert layer.wrap(SPEC, _handler) is _handler
