"""Migrations: applied once each, idempotent re-run, newer and altered schemas refused."""

from __future__ import annotations

import os
from pathlib import Path

import asyncpg
import pytest

from server import migrate
from server.app import App
from server.config import DatabaseConfig
from server.db import Database
from tests.support import databases
from tests.support.process import run_server, server_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def empty_db(postgres_url):
    name = f"tp_empty_{os.urandom(6).hex()}"
    conn = await databases.admin(postgres_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    yield databases.with_database(postgres_url, name)
    await databases.drop(postgres_url, name)


async def test_migrate_applies_once_and_rerun_is_noop(empty_db):
    conn = await asyncpg.connect(empty_db)
    try:
        first = await migrate.migrate(conn, migrate.load())
        assert [m.version for m in first] == [m.version for m in migrate.load()]
        assert await migrate.migrate(conn, migrate.load()) == []
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations ORDER BY 1")
        assert [(r["version"], r["checksum"]) for r in rows] == [
            (m.version, m.checksum) for m in migrate.load()
        ]
        assert await conn.fetchval("SELECT to_regclass('tenants') IS NOT NULL")
    finally:
        await conn.close()


async def test_failed_migration_rolls_back_alone(empty_db, tmp_path):
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE a (id int);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE b (id int); SELECT no_such_column;")
    conn = await asyncpg.connect(empty_db)
    try:
        with pytest.raises(asyncpg.PostgresError):
            await migrate.migrate(conn, migrate.load(tmp_path))
        assert await conn.fetchval("SELECT to_regclass('a') IS NOT NULL")
        assert not await conn.fetchval("SELECT to_regclass('b') IS NOT NULL")
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == 1
    finally:
        await conn.close()


def test_load_refuses_gaps_and_bad_names(tmp_path):
    (tmp_path / "0001_a.sql").write_text("")
    (tmp_path / "0003_c.sql").write_text("")
    with pytest.raises(migrate.MigrationError, match="0002 is missing"):
        migrate.load(tmp_path)
    (tmp_path / "0002-b.sql").write_text("")
    with pytest.raises(migrate.MigrationError, match="NNNN_description"):
        migrate.load(tmp_path)


async def test_changed_migration_is_refused(empty_db, tmp_path):
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (id int);")
    conn = await asyncpg.connect(empty_db)
    try:
        await migrate.migrate(conn, migrate.load(tmp_path))
        (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (id bigint);")
        with pytest.raises(migrate.MigrationError, match="changed after it was applied"):
            await migrate.migrate(conn, migrate.load(tmp_path))
    finally:
        await conn.close()


async def test_server_refuses_a_newer_database(make_config, database_url):
    conn = await asyncpg.connect(database_url)
    await conn.execute(
        "INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'future', 'x')"
    )
    await conn.close()
    with pytest.raises(migrate.SchemaTooNew, match="9999 is newer than this server"):
        async with App(make_config()):
            pass


async def test_check_mode_refuses_pending_migrations(make_config, empty_db):
    config = make_config(DATABASE_URL=empty_db, TRUSTPLANE_MIGRATE="check")
    with pytest.raises(migrate.MigrationError, match="pending"):
        async with App(config):
            pass


def test_migrate_command(empty_db):
    env = server_env(DATABASE_URL=empty_db)
    first = run_server("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stdout
    again = run_server("migrate", env=env)
    assert again.stdout.strip() == "database is up to date"


async def test_a_session_connection_goes_back_to_the_pool_without_its_locks(database_url):
    """Pooled connections are released without a reset; `Database.session()` (what the
    migration runner's session advisory lock uses) resets in full, so no lock outlives it."""
    db = await Database.connect(
        database_url, DatabaseConfig(url=database_url, pool_min=1, pool_max=1)
    )
    try:
        async with db.session() as conn:
            await conn.execute("SELECT pg_advisory_lock(4242)")
            pid = conn.get_server_pid()
        async with db.acquire() as conn:
            assert conn.get_server_pid() == pid  # the same pooled connection
            held = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1", pid
            )
        assert held == 0
    finally:
        await db.close()


async def test_comment_only_migration_is_recorded(empty_db, tmp_path):
    (tmp_path / "0001_reserved.sql").write_text("-- reserved for later\n")
    conn = await asyncpg.connect(empty_db)
    try:
        applied = await migrate.migrate(conn, migrate.load(tmp_path))
        assert [m.version for m in applied] == [1]
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 1
    finally:
        await conn.close()
