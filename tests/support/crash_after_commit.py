"""`python -m tests.support.crash_after_commit`: the real App (as `tests.support.app_process`)
whose process dies with `os._exit` the moment a CreateSession transaction has committed and
before anything is answered or cached: the exact window in which a client sees its call fail
although the session exists. Fault injection for tests only; the server itself has no hook."""

from __future__ import annotations

import asyncio
import os

from server.session.model import AgentSession, NewSession
from server.session.store import PgSessionStore
from tests.support import app_process

_commit = PgSessionStore.create_session


async def _commit_then_die(self: PgSessionStore, new: NewSession) -> tuple[AgentSession, bool]:
    await _commit(self, new)
    os._exit(137)  # like kill -9: no cleanup, no answer, nothing written to the cache


if __name__ == "__main__":
    PgSessionStore.create_session = _commit_then_die  # type: ignore[method-assign]
    asyncio.run(app_process.main())
