"""A TCP proxy in front of PostgreSQL that can lose the answer to a commit.

`LossyProxy` forwards every connection byte for byte. Once armed, the next audit append that
commits — a transaction that copied rows into `audit_entries` and then sends COMMIT, or a
call of `audit_append` (one statement, committed when PostgreSQL answers its Sync) — is passed
on to PostgreSQL, which commits; the proxy reads PostgreSQL's answer and, instead of
forwarding it, closes both sides. The client sees a connection lost in the middle of its
commit — an ambiguous commit — while the transaction is durable: exactly what a retry must not
append twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit

_COMMIT = b"Q\x00\x00\x00\x0cCOMMIT;\x00"  # asyncpg's simple-query COMMIT message
_READY = b"Z\x00\x00\x00\x05"  # ReadyForQuery: the end of PostgreSQL's answer


class LossyProxy:
    """See the module docstring; `async with LossyProxy(url) as proxy: proxy.url`."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._parts = parts
        self._server: asyncio.base_events.Server | None = None
        self._armed = False
        self.cut = asyncio.Event()  # set once an answer to COMMIT was swallowed
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        netloc = self._parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{port}"
        location = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
        return urlunsplit(self._parts._replace(netloc=location))

    def arm(self) -> None:
        """Lose the answer to the next COMMIT of a transaction that wrote audit entries."""
        self.cut.clear()
        self._armed = True

    async def __aenter__(self) -> LossyProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
            await _Connection(self, reader, writer, up_reader, up_writer).run()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    def take_arm(self) -> bool:
        armed, self._armed = self._armed, False
        return armed


class _Connection:
    def __init__(
        self,
        proxy: LossyProxy,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        server_reader: asyncio.StreamReader,
        server_writer: asyncio.StreamWriter,
    ) -> None:
        self._proxy = proxy
        self._client = (client_reader, client_writer)
        self._server = (server_reader, server_writer)
        self._copied = False  # this transaction copied rows into audit_entries
        self._appends: set[bytes] = set()  # names of prepared `audit_append` statements
        self._swallow: asyncio.Future[None] | None = None

    async def run(self) -> None:
        up = asyncio.ensure_future(self._pump_up())
        down = asyncio.ensure_future(self._pump_down())
        try:
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            self._server[1].close()
            self._client[1].close()

    async def _pump_up(self) -> None:
        reader, (_, writer) = self._client[0], self._server
        while chunk := await reader.read(65536):
            if b"COPY" in chunk and b"audit_entries" in chunk:
                self._copied = True
            committing = self._copied and _COMMIT in chunk
            if committing:
                self._copied = False
            if (committing or self._binds_append(chunk)) and self._proxy.take_arm():
                self._swallow = asyncio.get_running_loop().create_future()
            writer.write(chunk)
            await writer.drain()
            if self._swallow is not None:
                await self._swallow  # the answer arrived and was dropped: hang up
                return

    def _binds_append(self, chunk: bytes) -> bool:
        """Whether `chunk` runs a prepared `audit_append` (Bind of a statement whose Parse named
        it); remembers such Parses. Reads whole messages only, as asyncpg writes them."""
        found, at = False, 0
        while at + 5 <= len(chunk):
            kind, length = chunk[at : at + 1], int.from_bytes(chunk[at + 1 : at + 5], "big")
            body = chunk[at + 5 : at + 1 + length]
            if kind == b"P":
                name, _, rest = body.partition(b"\0")
                if rest.startswith(b"SELECT outcome, value FROM audit_append("):
                    self._appends.add(name)
            elif kind == b"B":
                statement = body.partition(b"\0")[2].partition(b"\0")[0]
                found = found or statement in self._appends
            at += 1 + length
        return found

    async def _pump_down(self) -> None:
        reader, (_, writer) = self._server[0], self._client
        seen = b""
        while chunk := await reader.read(65536):
            if self._swallow is None:
                writer.write(chunk)
                await writer.drain()
                continue
            seen += chunk
            if _READY in seen:  # PostgreSQL answered the COMMIT: it is committed
                self._proxy.cut.set()
                with contextlib.suppress(asyncio.InvalidStateError):
                    self._swallow.set_result(None)
                return
