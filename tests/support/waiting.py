"""Waiting for something another task or process does, by a deadline rather than a fixed sleep.

A fixed sleep ("the call has reached the handler by now") is a guess about the machine's speed:
on a loaded CI runner it is wrong, and the test fails for a reason that has nothing to do with
the code under test. `eventually` polls until the condition holds and fails only after a
generous deadline.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    *,
    what: str,
    timeout: float = 10.0,
    interval: float = 0.02,
) -> T:
    """Call `check` (plain or async) until it returns something truthy and return that;
    raise AssertionError naming `what` if `timeout` seconds pass first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            # A check that hangs (an RPC without a deadline) is cut off at the deadline too.
            async with asyncio.timeout(max(0.0, deadline - loop.time()) + interval):
                value = await value
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(interval)
