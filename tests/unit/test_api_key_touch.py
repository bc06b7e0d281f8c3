"""Coalesced last-use writes of API keys (a fake store, an injected clock)."""

from __future__ import annotations

from typing import Any

import pytest

from server.actor import ActorContext, AuthMethod, PrincipalType
from server.auth.api_keys import ApiKeys


class FlakyStore:
    """Fails the first `touch`, records the others."""

    def __init__(self) -> None:
        self.failures = 1
        self.writes: list[tuple[dict[str, float], dict[str, float]]] = []

    async def touch(self, api_keys: dict[str, float], principals: dict[str, float]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("database went away")
        self.writes.append((dict(api_keys), dict(principals)))


def _actor(key_id: str, subject: str) -> ActorContext:
    return ActorContext("t", subject, PrincipalType.AGENT, AuthMethod.API_KEY, token_id=key_id)


async def test_a_failed_write_is_kept_for_the_next_flush() -> None:
    now = [1000.0]
    store = FlakyStore()
    keys = ApiKeys(store, keys=None, clock=lambda: now[0])
    touch: Any = keys._touch
    touch(_actor("k1", "a1"), now[0])
    with pytest.raises(ConnectionError):
        await keys.flush()
    now[0] += 61
    touch(_actor("k2", "a2"), now[0])
    await keys.flush()
    assert store.writes == [({"k1": 1000.0, "k2": 1061.0}, {"a1": 1000.0, "a2": 1061.0})]
    await keys.flush()
    assert len(store.writes) == 1  # nothing pending: nothing written


async def test_remembered_touches_stay_bounded_and_no_use_is_lost(monkeypatch) -> None:
    monkeypatch.setattr("server.auth.api_keys._TOUCHED_LIMIT", 3)
    now = [1000.0]
    store = FlakyStore()
    store.failures = 0
    keys = ApiKeys(store, keys=None, clock=lambda: now[0])
    touch: Any = keys._touch
    for i in range(7):
        touch(_actor(f"k{i}", f"a{i}"), now[0])
        assert len(keys._touched) <= 3
    await keys.flush()
    assert sorted(store.writes[0][0]) == [f"k{i}" for i in range(7)]  # every use written
