"""Shared fast state: a small key/value and pub/sub interface with two interchangeable backends.

The server keeps idempotency leases and replay copies, rate-limit and quota counters,
revocation deny-lists, lockout counters and its watcher / cache-invalidation fan-out here.
`Cache` is the interface; both backends pass one contract suite
(tests/integration/test_cache_contract.py):

- `MemoryCache`: in-process, for a single server process (development, tests). Every operation
  runs without an `await` between its read and its write, so it is atomic by construction. Its
  clock is injectable so expiry can be tested without sleeping.
- `RedisCache`: redis-py's asyncio client. Multi-step operations are Lua scripts, so they are
  atomic across processes; TTLs are sent in milliseconds. Pub/sub shares one connection per
  instance, read by one background task that fans messages out to the subscriptions.

Keys and channels are plain strings; every key and every channel gets the instance's `prefix`
(for example "tp:"), so several deployments or tests can share one Redis. Values are bytes.
TTLs are seconds (float) and must be positive; `None` means "never expires".

When Redis cannot be reached, every operation raises `CacheUnavailable` (an `Unavailable`, so
a client sees UNAVAILABLE with a fixed message that never carries the URL). Whether a given use
fails open (carry on without the cache, e.g. a rate limit) or fails closed (refuse the request,
e.g. a revocation check) is decided by the caller, not here.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, cast

import redis.asyncio
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.errors import Unavailable

__all__ = [
    "Cache",
    "CacheUnavailable",
    "Charge",
    "ChargeResult",
    "MemoryCache",
    "RedisCache",
    "Subscription",
    "open_cache",
]

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 1000
# GCRA comparisons tolerate this much float noise, so waiting exactly `retry_after` suffices.
_THROTTLE_EPSILON = 1e-6


class CacheUnavailable(Unavailable):
    """The shared cache could not be reached; the message is fixed and names no server."""

    default_message = "cache unavailable"


@dataclass(frozen=True)
class Charge:
    """One counter of an all-or-nothing `Cache.charge`: add `amount` to the integer at `key`
    only if it stays <= `limit`; `ttl` applies when the charge creates the key."""

    key: str
    amount: int
    limit: int
    ttl: float


@dataclass(frozen=True)
class ChargeResult:
    """`charged`: every counter was added to. `values`: the counters after the charge, or
    their current values when it was refused. `replayed`: the receipt existed, so nothing was
    charged and `values` are the ones recorded by the first charge."""

    charged: bool
    values: tuple[int, ...]
    replayed: bool = False


class Cache(Protocol):
    """The operations the server needs from its shared fast state (see the module docstring)."""

    async def get(self, key: str) -> bytes | None:
        """The value stored at `key`, or None when it is missing or expired."""
        ...

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store `value`, replacing any previous value and expiry; `ttl=None` never expires."""
        ...

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool:
        """Store `value` only if `key` is missing; True if it was stored."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove `key`; True if it existed."""
        ...

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add `amount` to the integer at `key` (missing counts as 0) and return the result.

        `ttl` applies only when this call creates the key; later calls never extend it.
        """
        ...

    async def incr_if_below(
        self, key: str, amount: int, limit: int, ttl: float
    ) -> tuple[bool, int]:
        """Add `amount` only if the result stays <= `limit`.

        Returns (True, new value) when added, else (False, current value). `ttl` applies when
        this call creates the key.
        """
        ...

    async def charge(
        self, charges: Sequence[Charge], receipt: str | None = None, receipt_ttl: float = 1.0
    ) -> ChargeResult:
        """Add to several counters atomically, all or nothing (quotas and budgets).

        Every counter is added to only if each stays within its limit; otherwise none is.
        With `receipt`, a successful charge also stores a receipt at that key for
        `receipt_ttl` seconds, and a later call presenting the same receipt charges nothing
        and returns the recorded values (`replayed`): a retried request is charged once. A
        refused charge stores no receipt. With Redis Cluster, all keys must share a hash slot.
        """
        ...

    async def throttle(
        self, key: str, rate: float, burst: int, cost: int = 1
    ) -> tuple[bool, float]:
        """A GCRA token bucket refilled at `rate` tokens per second, holding at most `burst`.

        Takes `cost` tokens if available. Returns (allowed, retry_after seconds); retry_after is
        0.0 when allowed, else how long until `cost` tokens are available. State expires once
        the bucket is full again.
        """
        ...

    async def compare_and_delete(self, key: str, expected: bytes) -> bool:
        """Delete `key` only if its value equals `expected`; True if deleted."""
        ...

    async def compare_and_set(
        self, key: str, expected: bytes, value: bytes, ttl: float | None
    ) -> bool:
        """Replace the value only if it equals `expected`; True if replaced.

        The new expiry is `ttl`, as for `set` (`None`: the key no longer expires).
        """
        ...

    async def ttl(self, key: str) -> float | None:
        """Seconds until `key` expires; None if it is missing or never expires."""
        ...

    async def publish(self, channel: str, message: bytes) -> int:
        """Send `message` on `channel`; the number of receivers.

        Memory: the number of local subscriptions. Redis: the number of subscribed connections
        (each `RedisCache` counts once however many subscriptions it has).
        """
        ...

    def subscribe(self, *channels: str) -> Subscription:
        """A subscription to `channels`; active (nothing missed) once `async with` returns."""
        ...

    async def ping(self) -> None:
        """Raise `CacheUnavailable` unless the cache answers."""
        ...

    async def close(self) -> None:
        """Release connections and end every open subscription; safe to call twice."""
        ...


def open_cache(redis_url: str | None, prefix: str) -> Cache:
    """A `RedisCache` when a URL is configured, otherwise a `MemoryCache` (one process only)."""
    if redis_url:
        return RedisCache(redis_url, prefix)
    return MemoryCache(prefix)


# --- subscriptions ----------------------------------------------------------------------


class _Hub(Protocol):
    """What a `Subscription` needs from its backend: start and stop routing to it."""

    async def attach(self, subscription: Subscription) -> None: ...

    async def detach(self, subscription: Subscription) -> None: ...


@dataclass(frozen=True)
class _End:
    failed: bool


_Item = tuple[str, bytes] | _End


class Subscription:
    """Messages for some channels, as an async context manager and an async iterator.

    Inside `async with`, `async for channel, message in subscription` yields the channel
    (without prefix) and the payload. The iteration ends when the block is left or the cache
    is closed. Messages wait in a bounded queue; when it is full the oldest is dropped and
    counted in `dropped`.

    Delivery is at most once. If the Redis pub/sub connection drops, messages may have been
    missed, so the iteration raises `CacheUnavailable` instead of carrying on: subscribe again
    and resynchronise whatever the messages were keeping fresh.
    """

    def __init__(self, hub: _Hub, channels: Sequence[str], queue_size: int) -> None:
        if not channels:
            raise ValueError("subscribe needs at least one channel")
        self.channels: tuple[str, ...] = tuple(dict.fromkeys(channels))
        self.dropped = 0
        self._hub = hub
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(max(1, queue_size))
        self._entered = False

    async def __aenter__(self) -> Subscription:
        if self._entered:
            raise RuntimeError("a Subscription can be entered only once")
        self._entered = True
        await self._hub.attach(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            await self._hub.detach(self)
        finally:
            self.finish(failed=False)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[str, bytes]:
        if not self._entered:
            raise RuntimeError("use `async with` before iterating a Subscription")
        item = await self._queue.get()
        if isinstance(item, _End):
            self._queue.put_nowait(item)  # later calls end the same way
            if item.failed:
                raise CacheUnavailable()
            raise StopAsyncIteration
        return item

    def deliver(self, channel: str, message: bytes) -> bool:
        """Queue a message (called by the backend); True if the oldest had to be dropped."""
        return self._put((channel, message))

    def finish(self, *, failed: bool) -> None:
        """End the iteration after the queued messages (called by the backend)."""
        self._put(_End(failed))

    def _put(self, item: _Item) -> bool:
        dropped = False
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
            dropped = True
        self._queue.put_nowait(item)
        return dropped


# --- in-process backend -----------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    value: bytes
    expires_at: float | None


def _check_ttl(ttl: float) -> float:
    if not ttl > 0:  # also rejects NaN
        raise ValueError("ttl must be a positive number of seconds")
    return ttl


def _check_throttle(rate: float, burst: int, cost: int) -> None:
    if not rate > 0:
        raise ValueError("rate must be positive")
    if not 1 <= cost <= burst:
        raise ValueError("throttle needs 1 <= cost <= burst")


class _MemoryStore:
    """A dict of entries whose expiries are checked on read and swept (via a heap) on write."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._data: dict[str, _Entry] = {}
        self._expiries: list[tuple[float, str]] = []

    def deadline(self, ttl: float | None) -> float | None:
        return None if ttl is None else self.clock() + _check_ttl(ttl)

    def get(self, key: str) -> _Entry | None:
        entry = self._data.get(key)
        if entry is not None and entry.expires_at is not None and entry.expires_at <= self.clock():
            del self._data[key]
            return None
        return entry

    def put(self, key: str, value: bytes, expires_at: float | None) -> None:
        self._sweep()
        self._data[key] = _Entry(value, expires_at)
        if expires_at is not None:
            heapq.heappush(self._expiries, (expires_at, key))

    def pop(self, key: str) -> _Entry | None:
        entry = self.get(key)
        if entry is not None:
            del self._data[key]
        return entry

    def _sweep(self) -> None:
        now = self.clock()
        while self._expiries and self._expiries[0][0] <= now:
            _, key = heapq.heappop(self._expiries)
            self.get(key)  # removes it if it is (still) expired
        if len(self._expiries) > 2 * len(self._data) + 1024:
            self._expiries = [
                (e.expires_at, k) for k, e in self._data.items() if e.expires_at is not None
            ]
            heapq.heapify(self._expiries)


class _LocalHub:
    """Routes published messages to the subscriptions of one `MemoryCache`."""

    def __init__(self, prefix: str) -> None:
        self.dropped = 0
        self._prefix = prefix
        self._routes: dict[str, set[Subscription]] = {}

    async def attach(self, subscription: Subscription) -> None:
        for channel in subscription.channels:
            self._routes.setdefault(self._prefix + channel, set()).add(subscription)

    async def detach(self, subscription: Subscription) -> None:
        for channel in subscription.channels:
            subscribers = self._routes.get(self._prefix + channel, set())
            subscribers.discard(subscription)
            if not subscribers:
                self._routes.pop(self._prefix + channel, None)

    def publish(self, channel: str, message: bytes) -> int:
        subscribers = self._routes.get(self._prefix + channel, set())
        for subscription in subscribers:
            self.dropped += subscription.deliver(channel, message)
        return len(subscribers)

    def close(self) -> None:
        for subscription in {s for subs in self._routes.values() for s in subs}:
            subscription.finish(failed=False)
        self._routes.clear()


class MemoryCache:
    """`Cache` held in this process: only correct while the server runs as one process."""

    def __init__(
        self,
        prefix: str = "",
        *,
        clock: Callable[[], float] = time.monotonic,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        self.prefix = prefix
        self._store = _MemoryStore(clock)
        self._hub = _LocalHub(prefix)
        self._queue_size = queue_size

    @property
    def dropped_messages(self) -> int:
        """Messages dropped because a subscription's queue was full."""
        return self._hub.dropped

    async def get(self, key: str) -> bytes | None:
        """See `Cache.get`."""
        entry = self._store.get(self.prefix + key)
        return None if entry is None else entry.value

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """See `Cache.set`."""
        self._store.put(self.prefix + key, value, self._store.deadline(ttl))

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool:
        """See `Cache.set_if_absent`."""
        deadline = self._store.deadline(ttl)
        if self._store.get(self.prefix + key) is not None:
            return False
        self._store.put(self.prefix + key, value, deadline)
        return True

    async def delete(self, key: str) -> bool:
        """See `Cache.delete`."""
        return self._store.pop(self.prefix + key) is not None

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """See `Cache.incr`."""
        return self._add(self.prefix + key, amount, self._store.deadline(ttl))

    async def incr_if_below(
        self, key: str, amount: int, limit: int, ttl: float
    ) -> tuple[bool, int]:
        """See `Cache.incr_if_below`."""
        deadline = self._store.deadline(ttl)
        entry = self._store.get(self.prefix + key)
        current = 0 if entry is None else int(entry.value)
        if current + amount > limit:
            return False, current
        return True, self._add(self.prefix + key, amount, deadline)

    async def charge(
        self, charges: Sequence[Charge], receipt: str | None = None, receipt_ttl: float = 1.0
    ) -> ChargeResult:
        """See `Cache.charge`: no `await` between the reads and the writes, so atomic."""
        deadlines = [self._store.deadline(c.ttl) for c in charges]
        receipt_deadline = self._store.deadline(receipt_ttl)
        if receipt is not None:
            recorded = self._store.get(self.prefix + receipt)
            if recorded is not None:
                return ChargeResult(True, _parse_values(recorded.value), replayed=True)
        current = [self._current(c.key) for c in charges]
        if any(value + c.amount > c.limit for value, c in zip(current, charges, strict=True)):
            return ChargeResult(False, tuple(current))
        values = tuple(
            self._add(self.prefix + c.key, c.amount, deadline)
            for c, deadline in zip(charges, deadlines, strict=True)
        )
        if receipt is not None:
            self._store.put(self.prefix + receipt, _format_values(values), receipt_deadline)
        return ChargeResult(True, values)

    def _current(self, key: str) -> int:
        entry = self._store.get(self.prefix + key)
        return 0 if entry is None else int(entry.value)

    def _add(self, full_key: str, amount: int, deadline: float | None) -> int:
        entry = self._store.get(full_key)
        if entry is None:
            self._store.put(full_key, str(amount).encode(), deadline)
            return amount
        value = int(entry.value) + amount
        entry.value = str(value).encode()
        return value

    async def throttle(
        self, key: str, rate: float, burst: int, cost: int = 1
    ) -> tuple[bool, float]:
        """See `Cache.throttle`; the algorithm is the one `RedisCache` runs in Lua."""
        _check_throttle(rate, burst, cost)
        now = self._store.clock()
        entry = self._store.get(self.prefix + key)
        tat = now if entry is None else max(float(entry.value), now)
        interval = 1.0 / rate
        new_tat = tat + cost * interval
        wait = new_tat - burst * interval - now
        if wait > _THROTTLE_EPSILON:
            return False, wait
        self._store.put(self.prefix + key, repr(new_tat).encode(), new_tat)
        return True, 0.0

    async def compare_and_delete(self, key: str, expected: bytes) -> bool:
        """See `Cache.compare_and_delete`."""
        entry = self._store.get(self.prefix + key)
        if entry is None or entry.value != expected:
            return False
        self._store.pop(self.prefix + key)
        return True

    async def compare_and_set(
        self, key: str, expected: bytes, value: bytes, ttl: float | None
    ) -> bool:
        """See `Cache.compare_and_set`."""
        deadline = self._store.deadline(ttl)
        entry = self._store.get(self.prefix + key)
        if entry is None or entry.value != expected:
            return False
        self._store.put(self.prefix + key, value, deadline)
        return True

    async def ttl(self, key: str) -> float | None:
        """See `Cache.ttl`."""
        entry = self._store.get(self.prefix + key)
        if entry is None or entry.expires_at is None:
            return None
        return entry.expires_at - self._store.clock()

    async def publish(self, channel: str, message: bytes) -> int:
        """See `Cache.publish`: the number of local subscriptions reached."""
        return self._hub.publish(channel, message)

    def subscribe(self, *channels: str) -> Subscription:
        """See `Cache.subscribe`."""
        return Subscription(self._hub, channels, self._queue_size)

    async def ping(self) -> None:
        """Always answers: the memory backend cannot be unreachable."""

    async def close(self) -> None:
        """End every open subscription; the stored data stays readable."""
        self._hub.close()


def _format_values(values: Sequence[int]) -> bytes:
    return ",".join(str(v) for v in values).encode()


def _parse_values(raw: bytes) -> tuple[int, ...]:
    return tuple(int(v) for v in raw.decode().split(",") if v)


# --- Redis backend ----------------------------------------------------------------------

_INCR_WITH_TTL = """
local created = redis.call('EXISTS', KEYS[1]) == 0
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if created then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return value
"""

_INCR_IF_BELOW = """
local raw = redis.call('GET', KEYS[1])
local current = 0
if raw then current = tonumber(raw) end
if current + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return {0, current} end
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if not raw then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return {1, value}
"""

# KEYS: the counters, then the receipt key (when ARGV[1] == '1'). ARGV: has-receipt, receipt
# TTL (ms), then amount, limit, TTL (ms) per counter. Returns {status, values...}: 1 charged,
# 0 refused (current values), 2 replayed ({2, recorded values as "v1,v2"}).
_CHARGE = """
local n = #KEYS
if ARGV[1] == '1' then
  n = n - 1
  local recorded = redis.call('GET', KEYS[#KEYS])
  if recorded then return {2, recorded} end
end
local current = {}
for i = 1, n do
  local raw = redis.call('GET', KEYS[i])
  current[i] = raw and tonumber(raw) or 0
  if current[i] + tonumber(ARGV[3 * i]) > tonumber(ARGV[3 * i + 1]) then
    local out = {0}
    for j = 1, n do
      local r = redis.call('GET', KEYS[j])
      out[j + 1] = r and tonumber(r) or 0
    end
    return out
  end
end
local out = {1}
local text = {}
for i = 1, n do
  local created = redis.call('EXISTS', KEYS[i]) == 0
  local value = redis.call('INCRBY', KEYS[i], ARGV[3 * i])
  if created then redis.call('PEXPIRE', KEYS[i], ARGV[3 * i + 2]) end
  out[i + 1] = value
  text[i] = tostring(value)
end
if ARGV[1] == '1' then
  redis.call('SET', KEYS[#KEYS], table.concat(text, ','), 'PX', ARGV[2])
end
return out
"""

# GCRA: the key holds the "theoretical arrival time" (TAT) as Unix seconds, using the server's
# clock so that every process agrees. See MemoryCache.throttle for the same arithmetic.
_THROTTLE = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local epsilon = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local stored = redis.call('GET', KEYS[1])
local tat = now
if stored then tat = math.max(tonumber(stored), now) end
local interval = 1 / rate
local new_tat = tat + cost * interval
local wait = new_tat - burst * interval - now
if wait > epsilon then return {0, string.format('%.6f', wait)} end
local px = math.max(1, math.ceil((new_tat - now) * 1000))
redis.call('SET', KEYS[1], string.format('%.6f', new_tat), 'PX', px)
return {1, '0'}
"""

_COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '' then
  redis.call('SET', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"""


def _millis(ttl: float) -> int:
    return max(1, math.ceil(_check_ttl(ttl) * 1000))


@contextmanager
def _unavailable_on_error() -> Iterator[None]:
    """Turn Redis connection and timeout failures into `CacheUnavailable` (fixed message)."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, TimeoutError) as exc:
        raise CacheUnavailable() from exc


async def _close_quietly(pubsub: PubSub) -> None:
    try:
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated upstream
    except Exception:
        log.debug("closing a cache pub/sub connection failed", exc_info=True)


class _RedisHub:
    """One shared PubSub connection, read by one task that fans messages out to subscriptions.

    SUBSCRIBE / UNSUBSCRIBE are sent under a lock, so they reach Redis in the order the
    subscriptions come and go; `attach` returns only once Redis acknowledged the SUBSCRIBE.
    If the connection drops, open subscriptions end with `CacheUnavailable` (messages may have
    been missed) and the next subscription opens a new connection.
    """

    def __init__(self, client: redis.asyncio.Redis, prefix: str, ack_timeout: float) -> None:
        self.dropped = 0
        self._client = client
        self._prefix = prefix.encode()
        self._ack_timeout = ack_timeout
        self._lock = asyncio.Lock()
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._routes: dict[bytes, set[Subscription]] = {}
        self._acks: dict[bytes, asyncio.Future[None]] = {}

    async def attach(self, subscription: Subscription) -> None:
        names = [self._prefix + c.encode() for c in subscription.channels]
        async with self._lock:
            with _unavailable_on_error():
                pubsub = await self._started()
            fresh = [name for name in names if name not in self._routes]
            for name in names:
                self._routes.setdefault(name, set()).add(subscription)
            try:
                await self._subscribe(pubsub, fresh)
            except BaseException:
                self._forget(subscription)
                raise

    async def detach(self, subscription: Subscription) -> None:
        async with self._lock:
            idle = self._forget(subscription)
            if idle and self._pubsub is not None:
                try:
                    with _unavailable_on_error():
                        await self._pubsub.unsubscribe(*idle)
                except CacheUnavailable:
                    log.debug("pub/sub unsubscribe failed; the reader will notice")

    async def close(self) -> None:
        reader, pubsub = self._reader, self._pubsub
        self._reader, self._pubsub = None, None
        if reader is not None:
            reader.cancel()
        tasks = {*self._retiring, *([reader] if reader else [])}
        if tasks:
            await asyncio.wait(tasks)
        if pubsub is not None:
            await _close_quietly(pubsub)
        self._end_all(failed=False)

    async def _started(self) -> PubSub:
        if self._pubsub is None:
            pubsub = self._client.pubsub()
            try:
                await pubsub.connect()  # type: ignore[no-untyped-call]
            except BaseException:
                await _close_quietly(pubsub)
                raise
            self._pubsub = pubsub
            self._reader = asyncio.create_task(self._read(pubsub), name="cache-pubsub-reader")
        return self._pubsub

    async def _subscribe(self, pubsub: PubSub, names: list[bytes]) -> None:
        if not names:
            return
        loop = asyncio.get_running_loop()
        acks = [self._acks.setdefault(n, loop.create_future()) for n in names]
        try:
            if self._pubsub is not pubsub:  # the reader failed before we registered
                raise CacheUnavailable()
            with _unavailable_on_error():
                await pubsub.subscribe(*names)
                async with asyncio.timeout(self._ack_timeout):
                    await asyncio.gather(*acks)
        finally:
            for name in names:
                self._acks.pop(name, None)

    def _forget(self, subscription: Subscription) -> list[bytes]:
        """Stop routing to `subscription`; the channels nobody listens to any more."""
        idle = []
        for channel in subscription.channels:
            name = self._prefix + channel.encode()
            subscribers = self._routes.get(name)
            if subscribers is None:
                continue
            subscribers.discard(subscription)
            if not subscribers:
                del self._routes[name]
                idle.append(name)
        return idle

    async def _read(self, pubsub: PubSub) -> None:
        try:
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is not None:
                    self._dispatch(message)
        except Exception:
            log.warning("cache pub/sub connection lost; open subscriptions end", exc_info=True)
            self._on_lost()
            await _close_quietly(pubsub)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, name = message["type"], message["channel"]
        if kind == "subscribe":
            ack = self._acks.get(name)
            if ack is not None and not ack.done():
                ack.set_result(None)
        elif kind == "message":
            channel = name[len(self._prefix) :].decode()
            for subscription in self._routes.get(name, ()):
                self.dropped += subscription.deliver(channel, message["data"])

    def _on_lost(self) -> None:
        """Called by the reader when it fails: retire it and fail everything waiting on it."""
        if self._reader is not None:
            self._retiring.add(self._reader)
            self._reader.add_done_callback(self._retiring.discard)
        self._pubsub, self._reader = None, None
        for ack in self._acks.values():
            if not ack.done():
                ack.set_exception(CacheUnavailable())
        self._end_all(failed=True)

    def _end_all(self, *, failed: bool) -> None:
        for subscription in {s for subs in self._routes.values() for s in subs}:
            subscription.finish(failed=failed)
        self._routes.clear()


class RedisCache:
    """`Cache` in Redis: shared by every server process; atomic steps are Lua scripts."""

    def __init__(
        self,
        url: str,
        prefix: str = "",
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        ack_timeout: float = 5.0,
    ) -> None:
        self.prefix = prefix
        self._client = redis.asyncio.Redis.from_url(url, decode_responses=False)
        self._hub = _RedisHub(self._client, prefix, ack_timeout)
        self._queue_size = queue_size
        register = self._client.register_script
        self._incr_with_ttl = register(_INCR_WITH_TTL)
        self._incr_if_below = register(_INCR_IF_BELOW)
        self._charge = register(_CHARGE)
        self._throttle = register(_THROTTLE)
        self._compare_and_delete = register(_COMPARE_AND_DELETE)
        self._compare_and_set = register(_COMPARE_AND_SET)

    @property
    def dropped_messages(self) -> int:
        """Messages dropped because a subscription's queue was full."""
        return self._hub.dropped

    async def get(self, key: str) -> bytes | None:
        """See `Cache.get`."""
        with _unavailable_on_error():
            value = await self._client.get(self.prefix + key)
        return cast("bytes | None", value)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """See `Cache.set`."""
        px = None if ttl is None else _millis(ttl)
        with _unavailable_on_error():
            await self._client.set(self.prefix + key, value, px=px)

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool:
        """See `Cache.set_if_absent`."""
        px = _millis(ttl)
        with _unavailable_on_error():
            stored = await self._client.set(self.prefix + key, value, px=px, nx=True)
        return bool(stored)

    async def delete(self, key: str) -> bool:
        """See `Cache.delete`."""
        with _unavailable_on_error():
            removed = await self._client.delete(self.prefix + key)
        return bool(removed)

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """See `Cache.incr`."""
        full_key = self.prefix + key
        with _unavailable_on_error():
            if ttl is None:
                value = await self._client.incrby(full_key, amount)
            else:
                value = await self._incr_with_ttl(keys=[full_key], args=[amount, _millis(ttl)])
        return int(value)

    async def incr_if_below(
        self, key: str, amount: int, limit: int, ttl: float
    ) -> tuple[bool, int]:
        """See `Cache.incr_if_below`."""
        args = [amount, limit, _millis(ttl)]
        with _unavailable_on_error():
            added, value = await self._incr_if_below(keys=[self.prefix + key], args=args)
        return bool(added), int(value)

    async def charge(
        self, charges: Sequence[Charge], receipt: str | None = None, receipt_ttl: float = 1.0
    ) -> ChargeResult:
        """See `Cache.charge`: one Lua script."""
        keys = [self.prefix + c.key for c in charges]
        args: list[str | int] = ["1" if receipt is not None else "0", _millis(receipt_ttl)]
        for c in charges:
            args += [c.amount, c.limit, _millis(c.ttl)]
        if receipt is not None:
            keys.append(self.prefix + receipt)
        with _unavailable_on_error():
            reply = await self._charge(keys=keys, args=args)
        status, *values = reply
        if int(status) == 2:
            return ChargeResult(True, _parse_values(values[0]), replayed=True)
        return ChargeResult(int(status) == 1, tuple(int(v) for v in values))

    async def throttle(
        self, key: str, rate: float, burst: int, cost: int = 1
    ) -> tuple[bool, float]:
        """See `Cache.throttle`; runs on the Redis server's clock (`TIME`)."""
        _check_throttle(rate, burst, cost)
        args: list[str | int] = [repr(float(rate)), burst, cost, repr(_THROTTLE_EPSILON)]
        with _unavailable_on_error():
            allowed, wait = await self._throttle(keys=[self.prefix + key], args=args)
        return bool(allowed), 0.0 if allowed else float(wait)

    async def compare_and_delete(self, key: str, expected: bytes) -> bool:
        """See `Cache.compare_and_delete`."""
        with _unavailable_on_error():
            removed = await self._compare_and_delete(keys=[self.prefix + key], args=[expected])
        return bool(removed)

    async def compare_and_set(
        self, key: str, expected: bytes, value: bytes, ttl: float | None
    ) -> bool:
        """See `Cache.compare_and_set`."""
        px = "" if ttl is None else _millis(ttl)
        with _unavailable_on_error():
            replaced = await self._compare_and_set(
                keys=[self.prefix + key], args=[expected, value, px]
            )
        return bool(replaced)

    async def ttl(self, key: str) -> float | None:
        """See `Cache.ttl`."""
        with _unavailable_on_error():
            millis = int(await self._client.pttl(self.prefix + key))
        return None if millis < 0 else millis / 1000

    async def publish(self, channel: str, message: bytes) -> int:
        """See `Cache.publish`: the number of subscribed Redis connections."""
        with _unavailable_on_error():
            receivers = await self._client.publish(self.prefix + channel, message)
        return int(receivers)

    def subscribe(self, *channels: str) -> Subscription:
        """See `Cache.subscribe`: routed over this instance's one shared pub/sub connection."""
        return Subscription(self._hub, channels, self._queue_size)

    async def ping(self) -> None:
        """See `Cache.ping`."""
        with _unavailable_on_error():
            await self._client.ping()

    async def close(self) -> None:
        """Stop the pub/sub reader, end subscriptions and close every connection."""
        await self._hub.close()
        await self._client.aclose()
