"""The decision cache: bounded, expiring, off at size 0 (an injected clock, no sleeping)."""

from __future__ import annotations

from server.policy.active import DecisionCache
from server.policy.model import Decision, Effect, Reason


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def decision(n: int) -> Decision:
    return Decision(Effect.ALLOW, Reason.ALLOWED, f"v{n}", "p")


def test_it_evicts_the_least_recently_used():
    cache = DecisionCache(2, 60, Clock())
    cache.put("a", decision(1))
    cache.put("b", decision(2))
    assert cache.get("a") == decision(1)  # "a" is now the most recent
    cache.put("c", decision(3))
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (decision(1), None, decision(3))
    assert cache.stats() == {"hits": 3, "misses": 1, "size": 2}


def test_entries_expire():
    clock = Clock()
    cache = DecisionCache(10, 5, clock)
    cache.put("a", decision(1))
    clock.now += 4.9
    assert cache.get("a") == decision(1)
    clock.now += 0.2
    assert cache.get("a") is None


def test_size_zero_is_off_and_clear_empties():
    off = DecisionCache(0, 60, Clock())
    off.put("a", decision(1))
    assert not off.enabled and off.get("a") is None
    cache = DecisionCache(10, 60, Clock())
    cache.put("a", decision(1))
    cache.clear()
    assert cache.get("a") is None
