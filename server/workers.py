"""`serve --workers N`: N server processes sharing one port through SO_REUSEPORT.

The supervisor forks before any gRPC object exists (gRPC's core is not fork-safe once
started), after starting the embedded PostgreSQL if there is one and applying migrations once.
Each worker is a complete server with its own pool and Redis client; the kernel spreads new
connections across them. SIGTERM/SIGINT are forwarded so every worker drains gracefully. If a
worker dies on its own, the others are stopped and the supervisor exits non-zero, so that the
process manager (systemd, Kubernetes) restarts the whole unit rather than run degraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys

from server import runner
from server.config import Config
from server.embedded import EmbeddedPostgres

_log = logging.getLogger("trustplane.workers")


def supervise(config: Config) -> int:
    embedded = None
    if config.database.url is None:
        embedded = EmbeddedPostgres(config.data_dir)
        url = embedded.start()
        config = dataclasses.replace(config, database=dataclasses.replace(config.database, url=url))
    try:
        asyncio.run(runner.migrate_database(config.database.url or ""))
        return _run_children(config)
    finally:
        if embedded is not None:
            embedded.stop()


def _run_children(config: Config) -> int:
    children = {_fork(config, index): index for index in range(config.server.workers)}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            _signal(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while children:
        pid, code = os.wait()
        index = children.pop(pid, None)
        if index is None:
            continue
        exit_code = os.waitstatus_to_exitcode(code)
        if not stopping:
            _log.error("worker exited unexpectedly", extra={"worker": index, "code": exit_code})
            stopping, status = True, 1
            for other in children:
                _signal(other, signal.SIGTERM)
        elif exit_code != 0:
            status = 1
    return status


def _fork(config: Config, index: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    code = 1
    try:
        code = asyncio.run(runner.serve(config, worker_index=index))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
