"""Running one server process, and applying migrations, for the command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator

import asyncpg
from argon2 import PasswordHasher

from server import migrate
from server.app import App
from server.auth import service as auth_service
from server.auth.api_keys import ApiKeys
from server.auth.model import Principal
from server.auth.store import PgAuthStore
from server.cache import MemoryCache
from server.config import Config
from server.crypto import hierarchy
from server.crypto.service import KeyManager
from server.crypto.store import PgKeyStore
from server.db import Database
from server.embedded import EmbeddedPostgres
from server.errors import AlreadyExists, Unavailable

_log = logging.getLogger("trustplane.main")


@contextlib.contextmanager
def database(config: Config) -> Iterator[str]:
    """DATABASE_URL, or the embedded cluster started for the duration (admin commands)."""
    if config.database.url is not None:
        yield config.database.url
        return
    embedded = EmbeddedPostgres(config.data_dir)
    try:
        yield embedded.start()
    finally:
        embedded.stop()


async def migrate_database(dsn: str) -> list[migrate.Migration]:
    """Apply pending migrations to `dsn`; return what was applied."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate.migrate(conn, migrate.load())
    finally:
        await conn.close()


async def _first_run(app: App) -> str | None:
    """Zero-setup start on an empty embedded database: create a default tenant and owner."""
    if app.auth is None or not app.is_embedded or await app.auth.has_tenants():
        return None
    _, owner, password = await app.auth.bootstrap("default", "admin@localhost")
    assert app.api_keys is not None
    key = await _owner_api_key(app.api_keys, owner)
    return _credentials("default", "admin@localhost", password, key, app.config)


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
                first = await _first_run(app)
                if first:
                    print(first, flush=True)
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


def rotate_root(config: Config, *, generate: bool) -> int:
    """`keys rotate-root`: optionally add a new primary root key, then rewrap every KEK."""
    crypto = config.crypto
    if generate:
        if crypto.root_key is not None:
            print(
                "--generate works with a root key file; TRUSTPLANE_ROOT_KEY is set", file=sys.stderr
            )
            return 2
        hierarchy.add_primary_key(crypto.root_key_file or config.data_dir / "root.key")
    with database(config) as dsn:
        count = asyncio.run(_rewrap(config, dsn))
    print(f"rewrapped {count} tenant key-encryption key(s) under the primary root key")
    return 0


async def _rewrap(config: Config, dsn: str) -> int:
    db = await Database.connect(dsn, config.database)
    cache = MemoryCache()
    try:
        crypto = config.crypto
        roots = hierarchy.RootKeys.from_config(
            crypto.root_key, crypto.root_key_file, config.data_dir
        )
        return await KeyManager(PgKeyStore(db), roots, cache).rotate_root()
    finally:
        await cache.close()
        await db.close()


def bootstrap_command(config: Config, tenant: str, email: str) -> int:
    """`python -m server bootstrap`: the first tenant and its owner, password printed once."""
    try:
        with database(config) as dsn:
            password, key = asyncio.run(_bootstrap(config, dsn, tenant, email))
    except AlreadyExists as exc:
        print(f"bootstrap: {exc.message}", file=sys.stderr)
        return 1
    print(_credentials(tenant, email, password, key, config))
    return 0


async def _bootstrap(config: Config, dsn: str, tenant: str, email: str) -> tuple[str, str]:
    """The tenant, its owner and an owner API key; returns (password, API key)."""
    db = await Database.connect(dsn, config.database)
    cache = MemoryCache()
    try:
        async with db.session() as conn:  # migrate holds a session advisory lock
            await migrate.migrate(conn, migrate.load())
        store = PgAuthStore(db)
        _, owner, password = await auth_service.bootstrap(store, PasswordHasher(), tenant, email)
        crypto = config.crypto
        roots = hierarchy.RootKeys.from_config(
            crypto.root_key, crypto.root_key_file, config.data_dir
        )
        api_keys = ApiKeys(store, KeyManager(PgKeyStore(db), roots, cache))
        await api_keys.start()
        return password, await _owner_api_key(api_keys, owner)
    finally:
        await cache.close()
        await db.close()


async def _owner_api_key(api_keys: ApiKeys, owner: Principal) -> str:
    """A 90-day API key for the first owner, for scripts and grpcurl."""
    key, _ = await api_keys.create(
        owner, (), time.time() + 89 * 86_400.0, "bootstrap", str(uuid.uuid4())
    )
    return key


def _credentials(tenant: str, email: str, password: str, key: str, config: Config) -> str:
    address = str(config.server.listen)
    login = json.dumps({"tenant": tenant, "email": email, "password": password})
    return "\n".join(
        [
            f"created tenant {tenant!r} with owner {email}",
            f"  password (shown once): {password}",
            f"  API key (shown once, 89 days): {key}",
            "  log in, or call with the key:",
            f"  grpcurl -plaintext -d '{login}' {address} trustplane.auth.v1.AuthService/Login",
            f"  grpcurl -plaintext -H 'x-api-key: {key}' {address} "
            "trustplane.auth.v1.AuthService/WhoAmI",
        ]
    )
