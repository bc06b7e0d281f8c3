"""`MemoryCache` behaviour the contract suite cannot pin down exactly: expiry on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from server.cache import MemoryCache, RedisCache, open_cache


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(clock: FakeClock) -> MemoryCache:
    return MemoryCache("tp:", clock=clock)


async def test_key_lives_until_exactly_its_deadline(cache: MemoryCache, clock: FakeClock) -> None:
    await cache.set("k", b"v", ttl=5)
    clock.advance(3)
    assert await cache.ttl("k") == pytest.approx(2.0)
    clock.advance(1.999)
    assert await cache.get("k") == b"v"
    clock.advance(0.001)
    assert await cache.get("k") is None
    assert await cache.ttl("k") is None


async def test_expired_key_can_be_created_again(cache: MemoryCache, clock: FakeClock) -> None:
    assert await cache.set_if_absent("lease", b"a", ttl=1)
    clock.advance(1)
    assert await cache.set_if_absent("lease", b"b", ttl=1)
    assert await cache.get("lease") == b"b"


async def test_expired_counter_restarts_with_a_fresh_ttl(
    cache: MemoryCache, clock: FakeClock
) -> None:
    await cache.incr("n", 5, ttl=10)
    clock.advance(9)
    assert await cache.incr("n", ttl=10) == 6
    clock.advance(1)
    assert await cache.incr("n", ttl=10) == 1
    assert await cache.ttl("n") == pytest.approx(10.0)


async def test_expired_quota_starts_from_zero(cache: MemoryCache, clock: FakeClock) -> None:
    assert await cache.incr_if_below("q", 5, limit=5, ttl=60) == (True, 5)
    assert await cache.incr_if_below("q", 1, limit=5, ttl=60) == (False, 5)
    clock.advance(60)
    assert await cache.incr_if_below("q", 1, limit=5, ttl=60) == (True, 1)


async def test_compare_and_set_cannot_revive_an_expired_lease(
    cache: MemoryCache, clock: FakeClock
) -> None:
    await cache.set("lease", b"mine", ttl=2)
    clock.advance(2)
    assert await cache.compare_and_set("lease", b"mine", b"mine", ttl=2) is False
    assert await cache.compare_and_delete("lease", b"mine") is False


async def test_throttle_refills_one_token_per_interval(
    cache: MemoryCache, clock: FakeClock
) -> None:
    for _ in range(4):
        assert await cache.throttle("t", rate=2, burst=4) == (True, 0.0)
    allowed, retry_after = await cache.throttle("t", rate=2, burst=4)
    assert allowed is False
    assert retry_after == pytest.approx(0.5)
    clock.advance(0.25)
    allowed, retry_after = await cache.throttle("t", rate=2, burst=4)
    assert allowed is False
    assert retry_after == pytest.approx(0.25)
    clock.advance(0.25)
    assert await cache.throttle("t", rate=2, burst=4) == (True, 0.0)
    allowed, retry_after = await cache.throttle("t", rate=2, burst=4)
    assert allowed is False
    assert retry_after == pytest.approx(0.5)


async def test_throttle_bucket_never_holds_more_than_burst(
    cache: MemoryCache, clock: FakeClock
) -> None:
    await cache.throttle("t", rate=1, burst=3)
    clock.advance(1_000)
    results = [await cache.throttle("t", rate=1, burst=3) for _ in range(4)]
    assert [allowed for allowed, _ in results] == [True, True, True, False]


async def test_throttle_state_is_gone_once_the_bucket_is_full(
    cache: MemoryCache, clock: FakeClock
) -> None:
    await cache.throttle("t", rate=4, burst=8, cost=2)
    assert await cache.ttl("t") == pytest.approx(0.5)
    clock.advance(0.5)
    assert await cache.get("t") is None


async def test_incr_of_a_non_integer_raises(cache: MemoryCache) -> None:
    await cache.set("k", b"not a number")
    with pytest.raises(ValueError):
        await cache.incr("k")


async def test_publish_counts_local_subscriptions(cache: MemoryCache) -> None:
    async with cache.subscribe("c") as first, cache.subscribe("c", "d") as second:
        assert await cache.publish("c", b"m") == 2
        assert await cache.publish("d", b"m") == 1
        assert first.channels == ("c",)
        assert second.channels == ("c", "d")
    assert await cache.publish("c", b"m") == 0


async def test_full_queue_drops_the_oldest_and_counts_it(clock: FakeClock) -> None:
    cache = MemoryCache("tp:", clock=clock, queue_size=2)
    async with cache.subscribe("c") as sub:
        for i in range(5):
            await cache.publish("c", str(i).encode())
        assert sub.dropped == 3
        assert cache.dropped_messages == 3
        assert [await anext(sub), await anext(sub)] == [("c", b"3"), ("c", b"4")]


async def test_subscription_must_be_entered_once(cache: MemoryCache) -> None:
    sub = cache.subscribe("c")
    with pytest.raises(RuntimeError):
        await anext(sub)
    async with sub:
        pass
    with pytest.raises(RuntimeError):
        async with sub:
            pass


async def test_close_ends_subscriptions_after_queued_messages(cache: MemoryCache) -> None:
    async with cache.subscribe("c") as sub:
        await cache.publish("c", b"last")
        await cache.close()
        async with asyncio.timeout(1):
            assert [m async for m in sub] == [("c", b"last")]


async def test_open_cache_picks_the_backend_from_the_url() -> None:
    memory = open_cache(None, "tp:")
    assert isinstance(memory, MemoryCache)
    remote = open_cache("redis://127.0.0.1:1/0", "tp:")
    try:
        assert isinstance(remote, RedisCache)
    finally:
        await remote.close()
        await memory.close()
