"""The `Cache` contract: every test runs against `MemoryCache` and `RedisCache` alike.

Time passes through `Backend.elapse`: the memory backend's fake clock is advanced, Redis is
given small real TTLs and a short sleep (well under three seconds for the whole suite).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from uuid import uuid4

import pytest
import redis.asyncio

from server.cache import (
    Cache,
    CacheUnavailable,
    Charge,
    ChargeResult,
    MemoryCache,
    RedisCache,
    Subscription,
)
from server.errors import Unavailable

TIMEOUT = 2.0


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Backend:
    """Builds caches of one kind for one test, lets time pass for them, closes them after."""

    def __init__(self) -> None:
        self.kind = ""
        self.redis_url = ""
        self.clock = FakeClock()
        self._created: list[Cache] = []

    def new(self, prefix: str | None = None, queue_size: int = 1000) -> Cache:
        prefix = f"test:{uuid4().hex}:" if prefix is None else prefix
        cache: Cache
        if self.kind == "memory":
            cache = MemoryCache(prefix, clock=self.clock, queue_size=queue_size)
        else:
            cache = RedisCache(self.redis_url, prefix, queue_size=queue_size)
        self._created.append(cache)
        return cache

    async def elapse(self, seconds: float) -> None:
        if self.kind == "memory":
            self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)

    async def aclose(self) -> None:
        for cache in self._created:
            await cache.close()


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    built = Backend()
    yield built
    await built.aclose()


@pytest.fixture(params=["memory", "redis"])
def cache(request: pytest.FixtureRequest, backend: Backend) -> Cache:
    backend.kind = request.param
    if request.param == "redis":
        backend.redis_url = request.getfixturevalue("redis_url")
    return backend.new()


async def receive(subscription: Subscription, count: int) -> list[tuple[str, bytes]]:
    async with asyncio.timeout(TIMEOUT):
        return [await anext(subscription) for _ in range(count)]


# --- get / set / delete -------------------------------------------------------------------


async def test_get_returns_what_set_stored_and_set_overwrites(cache: Cache) -> None:
    assert await cache.get("k") is None
    await cache.set("k", b"one")
    assert await cache.get("k") == b"one"
    await cache.set("k", b"\x00two\xff")
    assert await cache.get("k") == b"\x00two\xff"


async def test_set_without_ttl_removes_a_previous_expiry(cache: Cache) -> None:
    await cache.set("k", b"v", ttl=30)
    await cache.set("k", b"w")
    assert await cache.ttl("k") is None
    assert await cache.get("k") == b"w"


async def test_set_if_absent_stores_only_once(cache: Cache) -> None:
    assert await cache.set_if_absent("lease", b"owner-1", ttl=30) is True
    assert await cache.set_if_absent("lease", b"owner-2", ttl=30) is False
    assert await cache.get("lease") == b"owner-1"


async def test_delete_reports_whether_the_key_existed(cache: Cache) -> None:
    await cache.set("k", b"v")
    assert await cache.delete("k") is True
    assert await cache.get("k") is None
    assert await cache.delete("k") is False


async def test_ttl_reports_remaining_seconds_or_none(cache: Cache) -> None:
    await cache.set("forever", b"v")
    await cache.set("brief", b"v", ttl=10)
    assert await cache.ttl("missing") is None
    assert await cache.ttl("forever") is None
    remaining = await cache.ttl("brief")
    assert remaining is not None
    assert 9.0 < remaining <= 10.0


async def test_keys_with_ttl_expire_and_others_stay(cache: Cache, backend: Backend) -> None:
    await cache.set("forever", b"v")
    await cache.set("plain", b"v", ttl=0.2)
    assert await cache.set_if_absent("lease", b"a", ttl=0.2)
    assert await cache.incr("count", ttl=0.2) == 1
    assert await cache.incr_if_below("quota", 1, limit=5, ttl=0.2) == (True, 1)
    await cache.set("swapped", b"old")
    assert await cache.compare_and_set("swapped", b"old", b"new", ttl=0.2)
    await backend.elapse(0.3)
    for key in ("plain", "lease", "count", "quota", "swapped"):
        assert await cache.get(key) is None, key
    assert await cache.get("forever") == b"v"
    assert await cache.set_if_absent("lease", b"b", ttl=5) is True
    assert await cache.incr("count") == 1


@pytest.mark.parametrize("ttl", [0, -1.0, float("nan")])
async def test_ttl_must_be_positive(cache: Cache, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        await cache.set("k", b"v", ttl=ttl)
    with pytest.raises(ValueError, match="ttl"):
        await cache.set_if_absent("k", b"v", ttl=ttl)
    with pytest.raises(ValueError, match="ttl"):
        await cache.incr("k", ttl=ttl)
    assert await cache.get("k") is None


# --- counters -------------------------------------------------------------------------------


async def test_incr_counts_from_zero_by_any_amount(cache: Cache) -> None:
    assert await cache.incr("n") == 1
    assert await cache.incr("n", 5) == 6
    assert await cache.incr("n", -2) == 4
    assert await cache.get("n") == b"4"
    assert await cache.ttl("n") is None


async def test_incr_sets_ttl_only_when_it_creates_the_key(cache: Cache) -> None:
    await cache.incr("n", ttl=10)
    await cache.incr("n", ttl=100)
    remaining = await cache.ttl("n")
    assert remaining is not None
    assert 9.0 < remaining <= 10.0
    await cache.set("existing", b"7")
    assert await cache.incr("existing", ttl=10) == 8
    assert await cache.ttl("existing") is None


async def test_incr_if_below_adds_up_to_the_limit_and_no_further(cache: Cache) -> None:
    results = [await cache.incr_if_below("q", 3, limit=10, ttl=10) for _ in range(4)]
    assert results == [(True, 3), (True, 6), (True, 9), (False, 9)]
    assert await cache.incr_if_below("q", 1, limit=10, ttl=10) == (True, 10)
    assert await cache.incr_if_below("q", 1, limit=10, ttl=10) == (False, 10)
    assert await cache.get("q") == b"10"


async def test_incr_if_below_sets_ttl_only_on_creation(cache: Cache) -> None:
    assert await cache.incr_if_below("q", 1, limit=10, ttl=10) == (True, 1)
    assert await cache.incr_if_below("q", 1, limit=10, ttl=100) == (True, 2)
    remaining = await cache.ttl("q")
    assert remaining is not None
    assert 9.0 < remaining <= 10.0


async def test_incr_if_below_refusal_creates_nothing(cache: Cache) -> None:
    assert await cache.incr_if_below("q", 11, limit=10, ttl=10) == (False, 0)
    assert await cache.get("q") is None


async def test_incr_if_below_never_exceeds_the_limit_under_concurrency(cache: Cache) -> None:
    results = await asyncio.gather(
        *(cache.incr_if_below("q", 1, limit=10, ttl=30) for _ in range(50))
    )
    granted = sorted(value for ok, value in results if ok)
    assert granted == list(range(1, 11))
    assert all(value == 10 for ok, value in results if not ok)
    assert await cache.get("q") == b"10"


# --- throttle -------------------------------------------------------------------------------


async def test_throttle_allows_burst_then_refuses_until_a_token_returns(
    cache: Cache, backend: Backend
) -> None:
    rate, burst = 10.0, 3
    for _ in range(burst):
        assert await cache.throttle("t", rate, burst) == (True, 0.0)
    allowed, retry_after = await cache.throttle("t", rate, burst)
    assert allowed is False
    assert 0.5 / rate < retry_after <= 1 / rate + 1e-3
    await backend.elapse(retry_after / 2)
    assert (await cache.throttle("t", rate, burst))[0] is False
    await backend.elapse(retry_after / 2 + 0.01)
    assert await cache.throttle("t", rate, burst) == (True, 0.0)
    assert (await cache.throttle("t", rate, burst))[0] is False


async def test_throttle_cost_takes_several_tokens(cache: Cache) -> None:
    rate, burst = 10.0, 3
    assert await cache.throttle("t", rate, burst, cost=2) == (True, 0.0)
    allowed, retry_after = await cache.throttle("t", rate, burst, cost=2)
    assert allowed is False
    assert 0.5 / rate < retry_after <= 1 / rate + 1e-3
    assert await cache.throttle("t", rate, burst, cost=1) == (True, 0.0)


async def test_throttle_keys_are_independent(cache: Cache) -> None:
    assert await cache.throttle("a", 1.0, 1) == (True, 0.0)
    assert (await cache.throttle("a", 1.0, 1))[0] is False
    assert await cache.throttle("b", 1.0, 1) == (True, 0.0)


async def test_throttle_state_expires_once_the_bucket_is_full(cache: Cache) -> None:
    await cache.throttle("t", 10.0, 5, cost=2)
    remaining = await cache.ttl("t")
    assert remaining is not None
    assert 0.1 < remaining <= 0.2 + 1e-3


@pytest.mark.parametrize(("rate", "burst", "cost"), [(0.0, 1, 1), (1.0, 2, 3), (1.0, 1, 0)])
async def test_throttle_rejects_impossible_parameters(
    cache: Cache, rate: float, burst: int, cost: int
) -> None:
    with pytest.raises(ValueError):
        await cache.throttle("t", rate, burst, cost)


# --- compare-and-* --------------------------------------------------------------------------


async def test_compare_and_delete_needs_the_expected_value(cache: Cache) -> None:
    await cache.set("lease", b"mine")
    assert await cache.compare_and_delete("lease", b"theirs") is False
    assert await cache.get("lease") == b"mine"
    assert await cache.compare_and_delete("missing", b"mine") is False
    assert await cache.compare_and_delete("lease", b"mine") is True
    assert await cache.get("lease") is None


async def test_compare_and_set_with_wrong_value_changes_nothing(cache: Cache) -> None:
    await cache.set("lease", b"mine", ttl=10)
    assert await cache.compare_and_set("lease", b"theirs", b"stolen", ttl=100) is False
    assert await cache.get("lease") == b"mine"
    remaining = await cache.ttl("lease")
    assert remaining is not None
    assert remaining <= 10.0
    assert await cache.compare_and_set("missing", b"x", b"y", ttl=None) is False
    assert await cache.get("missing") is None


async def test_compare_and_set_replaces_value_and_expiry(cache: Cache) -> None:
    await cache.set("lease", b"v1", ttl=10)
    assert await cache.compare_and_set("lease", b"v1", b"v2", ttl=100) is True
    assert await cache.get("lease") == b"v2"
    remaining = await cache.ttl("lease")
    assert remaining is not None
    assert 99.0 < remaining <= 100.0
    assert await cache.compare_and_set("lease", b"v2", b"v3", ttl=None) is True
    assert await cache.get("lease") == b"v3"
    assert await cache.ttl("lease") is None


# --- pub/sub --------------------------------------------------------------------------------


async def test_publish_without_subscribers_reaches_nobody(cache: Cache) -> None:
    assert await cache.publish("events", b"lost") == 0


async def test_pubsub_delivers_in_order_to_every_subscriber(cache: Cache) -> None:
    messages = [f"m{i}".encode() for i in range(5)]
    async with cache.subscribe("events") as first, cache.subscribe("events") as second:
        for message in messages:
            assert await cache.publish("events", message) >= 1
        expected = [("events", m) for m in messages]
        assert await receive(first, 5) == expected
        assert await receive(second, 5) == expected


async def test_subscription_receives_only_its_channels(cache: Cache) -> None:
    async with cache.subscribe("a", "b") as sub:
        await cache.publish("c", b"not mine")
        await cache.publish("b", b"to b")
        await cache.publish("a", b"to a")
        assert await receive(sub, 2) == [("b", b"to b"), ("a", b"to a")]


async def test_leaving_subscriber_stops_receiving_others_continue(cache: Cache) -> None:
    async with cache.subscribe("events") as staying:
        async with cache.subscribe("events") as leaving:
            assert await cache.publish("events", b"both") >= 1
            assert await receive(leaving, 1) == [("events", b"both")]
        assert await cache.publish("events", b"one") >= 1
        assert await receive(staying, 2) == [("events", b"both"), ("events", b"one")]
        async with asyncio.timeout(TIMEOUT):
            assert [m async for m in leaving] == []
    assert await cache.publish("events", b"nobody") == 0


async def test_channel_can_be_subscribed_again_after_everyone_left(cache: Cache) -> None:
    async with cache.subscribe("events"):
        pass
    async with cache.subscribe("events") as sub:
        await cache.publish("events", b"again")
        assert await receive(sub, 1) == [("events", b"again")]


async def test_full_subscription_queue_drops_the_oldest(backend: Backend, cache: Cache) -> None:
    small = backend.new(queue_size=2)
    async with small.subscribe("events") as sub, small.subscribe("events") as witness:
        for i in range(5):
            await small.publish("events", str(i).encode())
        async with asyncio.timeout(TIMEOUT):
            while (await anext(witness))[1] != b"4":  # every message reached both queues
                pass
        assert sub.dropped == 3
        assert await receive(sub, 2) == [("events", b"3"), ("events", b"4")]


async def test_close_ends_open_subscriptions(cache: Cache) -> None:
    async with cache.subscribe("events") as sub:
        await cache.close()
        async with asyncio.timeout(TIMEOUT):
            assert [m async for m in sub] == []


async def test_subscribe_needs_a_channel(cache: Cache) -> None:
    with pytest.raises(ValueError, match="channel"):
        cache.subscribe()


async def test_ping_answers(cache: Cache) -> None:
    await cache.ping()


# --- Redis only: prefixes and failures -------------------------------------------------------


async def test_prefixes_isolate_keys_and_channels(redis_url: str, backend: Backend) -> None:
    backend.kind, backend.redis_url = "redis", redis_url
    prefix = f"test:{uuid4().hex}:"
    mine, same_prefix, other = backend.new(prefix), backend.new(prefix), backend.new()
    await mine.set("k", b"mine")
    assert await same_prefix.get("k") == b"mine"
    assert await other.get("k") is None
    assert await other.delete("k") is False
    assert await mine.get("k") == b"mine"
    async with other.subscribe("events") as theirs, same_prefix.subscribe("events") as ours:
        assert await mine.publish("events", b"hello") == 1
        await other.publish("events", b"other")
        assert await receive(ours, 1) == [("events", b"hello")]
        assert await receive(theirs, 1) == [("events", b"other")]


async def test_keys_are_stored_under_the_prefix(redis_url: str) -> None:
    prefix = f"test:{uuid4().hex}:"
    cache = RedisCache(redis_url, prefix)
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        await cache.set("k", b"v")
        assert await raw.get(prefix + "k") == b"v"
    finally:
        await raw.delete(prefix + "k")
        await raw.aclose()
        await cache.close()


async def test_entering_a_subscription_waits_for_the_subscribe_ack(redis_url: str) -> None:
    prefix = f"test:{uuid4().hex}:"
    cache = RedisCache(redis_url, prefix)
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        async with cache.subscribe("warm-up"):  # opens the shared pub/sub connection
            pass
        await raw.client_pause(200)  # Redis holds every command, SUBSCRIBE included
        started = time.monotonic()
        async with cache.subscribe("events"):
            waited = time.monotonic() - started
            assert await raw.pubsub_numsub(prefix + "events") == [((prefix + "events").encode(), 1)]
        assert waited >= 0.15
    finally:
        await raw.aclose()
        await cache.close()


async def test_dropped_pubsub_connection_ends_subscriptions_loudly(redis_url: str) -> None:
    cache = RedisCache(redis_url, f"test:{uuid4().hex}:")
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        before = {c["id"] for c in await raw.client_list(_type="pubsub")}
        async with cache.subscribe("events") as sub:
            after = {c["id"] for c in await raw.client_list(_type="pubsub")}
            (ours,) = after - before
            await raw.client_kill_filter(_id=ours)
            with pytest.raises(CacheUnavailable):
                await receive(sub, 1)
        async with cache.subscribe("events") as again:
            await cache.publish("events", b"back")
            assert await receive(again, 1) == [("events", b"back")]
    finally:
        await raw.aclose()
        await cache.close()


async def test_unreachable_redis_raises_cache_unavailable_without_the_url() -> None:
    url = "redis://:hunter2@127.0.0.1:1/0"
    cache = RedisCache(url, "test:")
    try:
        for operation in (
            cache.ping,
            lambda: cache.get("k"),
            lambda: cache.set("k", b"v"),
            lambda: cache.incr("k", ttl=1),
            lambda: cache.throttle("k", 1.0, 1),
            lambda: cache.publish("c", b"m"),
        ):
            with pytest.raises(CacheUnavailable) as caught:
                await operation()
            assert isinstance(caught.value, Unavailable)
            message = str(caught.value)
            assert message == "cache unavailable"
            assert "hunter2" not in message
            assert "127.0.0.1" not in message
        with pytest.raises(CacheUnavailable):
            async with cache.subscribe("c"):
                pass
    finally:
        await cache.close()


# --- charge (quotas) --------------------------------------------------------------------------


async def test_charge_adds_to_every_counter_or_to_none(cache: Cache) -> None:
    both = [Charge("a", 2, 5, 10), Charge("b", 1, 2, 10)]
    assert await cache.charge(both) == ChargeResult(True, (2, 1))
    assert await cache.charge(both) == ChargeResult(True, (4, 2))
    # "b" would exceed its limit: "a" is not charged either.
    assert await cache.charge(both) == ChargeResult(False, (4, 2))
    assert (await cache.get("a"), await cache.get("b")) == (b"4", b"2")
    assert await cache.charge([Charge("a", 1, 5, 10)]) == ChargeResult(True, (5,))


async def test_charge_refusal_creates_nothing_and_sets_ttl_on_creation(cache: Cache) -> None:
    assert await cache.charge([Charge("q", 3, 2, 10)]) == ChargeResult(False, (0,))
    assert await cache.get("q") is None
    assert await cache.charge([Charge("q", 1, 2, 10)]) == ChargeResult(True, (1,))
    assert await cache.charge([Charge("q", 1, 2, 100)]) == ChargeResult(True, (2,))
    remaining = await cache.ttl("q")
    assert remaining is not None and 9.0 < remaining <= 10.0


async def test_charge_with_a_receipt_charges_once(cache: Cache) -> None:
    charge = [Charge("q", 1, 10, 10)]
    first = await cache.charge(charge, receipt="r1", receipt_ttl=10)
    assert first == ChargeResult(True, (1,))
    assert await cache.charge(charge, receipt="r1", receipt_ttl=10) == ChargeResult(
        True, (1,), replayed=True
    )
    assert await cache.get("q") == b"1"
    assert await cache.charge(charge, receipt="r2", receipt_ttl=10) == ChargeResult(True, (2,))
    # A refused charge leaves no receipt: the retry is decided again.
    assert not (await cache.charge([Charge("full", 5, 1, 10)], receipt="r3")).charged
    assert await cache.get("r3") is None


async def test_charge_receipt_expires(cache: Cache, backend: Backend) -> None:
    await cache.charge([Charge("q", 1, 10, 10)], receipt="r", receipt_ttl=0.2)
    await backend.elapse(0.3)
    assert await cache.charge([Charge("q", 1, 10, 10)], receipt="r") == ChargeResult(True, (2,))


async def test_charge_never_exceeds_a_limit_under_concurrency(cache: Cache) -> None:
    results = await asyncio.gather(
        *(
            cache.charge([Charge("tenant", 1, 10, 30), Charge(f"user{i % 2}", 1, 100, 30)])
            for i in range(50)
        )
    )
    assert sum(r.charged for r in results) == 10
    assert sorted(r.values[0] for r in results if r.charged) == list(range(1, 11))
    assert await cache.get("tenant") == b"10"
