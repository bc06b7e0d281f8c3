"""`grpc.health.v1` status that follows the database: NOT_SERVING while PostgreSQL is down.

A probe runs `SELECT 1` every TRUSTPLANE_HEALTH_INTERVAL seconds and flips every registered
service name (and `""`, the whole server) between SERVING and NOT_SERVING. Watchers
(`Health/Watch`) see each flip. On shutdown every name goes NOT_SERVING for good, before the
server stops accepting calls, so load balancers drain it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

_log = logging.getLogger("trustplane.health")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

Probe = Callable[[], Awaitable[bool]]


class HealthMonitor:
    """Owns the health servicer's statuses."""

    def __init__(
        self,
        services: Sequence[str],
        probe: Probe,
        interval: float,
        on_change: Callable[[bool], None] = lambda _: None,
    ) -> None:
        self.servicer = HealthServicer()
        self._names = ("", *services)
        self._probe = probe
        self._interval = interval
        self._on_change = on_change
        self._serving: bool | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Probe once (so the first answer is true), then keep probing in the background."""
        await self._update(await self._probe())
        self._task = asyncio.create_task(self._run(), name="health-probe")

    async def shutdown(self) -> None:
        """Stop probing and report NOT_SERVING for every name, permanently."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.servicer.enter_graceful_shutdown()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self._update(await self._probe())

    async def _update(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        status = SERVING if serving else NOT_SERVING
        for name in self._names:
            await self.servicer.set(name, status)
        self._on_change(serving)
        log = _log.info if serving else _log.warning
        log(
            "database %s; health %s",
            "reachable" if serving else "unreachable",
            "SERVING" if serving else "NOT_SERVING",
        )
