"""Forward-only SQL migrations: `migrations/NNNN_description.sql`, each applied once.

Each file runs in its own transaction together with its row in `schema_migrations`, under a
PostgreSQL advisory lock so that several processes starting at once migrate exactly once. A
database that records a version this server does not know is newer than the server: start-up
stops rather than run old code against a schema it does not understand. An applied file whose
checksum changed is refused too: migrations are immutable once released.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x74727573_74706C61 & 0x7FFFFFFFFFFFFFFF  # "trustpla"


class MigrationError(RuntimeError):
    """The migration set or the database's record of it is inconsistent."""


class SchemaTooNew(MigrationError):
    """The database was migrated by a newer server."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Read and validate the migration files: numbered 0001, 0002, … without gaps."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: expected NNNN_description.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(f"migration {expected:04d} is missing")
    return found


_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


async def migrate(conn: asyncpg.Connection, migrations: list[Migration]) -> list[Migration]:
    """Apply what is pending; return what was applied (empty when up to date)."""
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(_CREATE_TABLE)
        pending = await _pending(conn, migrations)
        for migration in pending:
            async with conn.transaction():
                if _has_statements(migration.sql):  # asyncpg fails on a comment-only query
                    await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
        return pending
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


def _has_statements(sql: str) -> bool:
    code = "\n".join(line.split("--", 1)[0] for line in sql.splitlines())
    return bool(code.replace(";", "").strip())


async def check(conn: asyncpg.Connection, migrations: list[Migration]) -> list[Migration]:
    """Validate without applying; return the pending migrations."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    return await _pending(conn, migrations) if exists else list(migrations)


async def _pending(conn: asyncpg.Connection, migrations: list[Migration]) -> list[Migration]:
    rows = await conn.fetch("SELECT version, checksum FROM schema_migrations ORDER BY version")
    applied = {row["version"]: row["checksum"] for row in rows}
    known = {m.version: m for m in migrations}
    newest = max(known, default=0)
    if applied and max(applied) > newest:
        raise SchemaTooNew(
            f"database schema version {max(applied)} is newer than this server ({newest}); "
            "upgrade the server"
        )
    for version, checksum in applied.items():
        if known[version].checksum != checksum:
            raise MigrationError(f"migration {version:04d} changed after it was applied")
    return [m for m in migrations if m.version not in applied]
