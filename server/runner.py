"""Running one server process, and applying migrations, for the command line."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import asyncpg

from server import migrate
from server.app import App
from server.config import Config
from server.errors import Unavailable

_log = logging.getLogger("trustplane.main")


async def migrate_database(dsn: str) -> list[migrate.Migration]:
    """Apply pending migrations to `dsn`; return what was applied."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate.migrate(conn, migrate.load())
    finally:
        await conn.close()


async def serve(config: Config, worker_index: int = 0) -> int:
    """Run one server process until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with App(config, worker_index=worker_index) as app:
            if worker_index == 0:
                _banner(app.address, app.metrics_port, config.server.tls is not None)
            await stop.wait()
            _log.info("shutting down", extra={"grace_period": config.server.grace_period})
    except (migrate.MigrationError, OSError, Unavailable) as exc:
        _log.error("cannot start: %s", exc)
        return 1
    return 0


def _banner(address: str, metrics_port: int | None, tls: bool) -> None:
    flag = "" if tls else "-plaintext "
    lines = [
        f"trustplane listening on {address} (pid {os.getpid()})",
        f"  grpcurl {flag}{address} list",
        f"  grpcurl {flag}{address} grpc.health.v1.Health/Check",
    ]
    if metrics_port is not None:
        lines.append(f"  metrics: http://127.0.0.1:{metrics_port}/metrics")
    print("\n".join(lines), flush=True)
