"""PostgreSQL store of the policy feature: bundle versions and the activation history.

The only place the feature's SQL lives; every query names the tenant. Activation and rollback
of one tenant are serialized by a transaction-scoped advisory lock on the tenant.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg

from server.db import Database
from server.errors import NotFound
from server.policy.model import StoredBundle


class BundleNotFound(NotFound):
    default_message = "policy bundle version not found"


_COLUMNS = """b.version_id, b.label, b.format, b.resource_kinds, b.quotas, b.test_count,
    b.create_principal, b.created_at"""

_ACTIVE = """(SELECT a.version_id FROM policy_activations a
    WHERE a.tenant_id = $1 AND a.undone_at IS NULL ORDER BY a.id DESC LIMIT 1)"""


def _bundle(row: Any, *, source: bool = False, active: bool = False) -> StoredBundle:
    return StoredBundle(
        version_id=row["version_id"],
        label=row["label"],
        format=row["format"],
        resource_kinds=tuple(row["resource_kinds"]),
        quotas=tuple(row["quotas"]),
        test_count=row["test_count"],
        create_principal=row["create_principal"],
        create_time=row["created_at"].timestamp(),
        source=row["source"] if source else "",
        active=active or bool(row.get("active", False)),
    )


class PgPolicyStore:
    """Bundle versions and activations in PostgreSQL."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def put(self, tenant_id: str, bundle: StoredBundle) -> StoredBundle:
        """Store a version unless it exists (same content, same id); return the stored one."""
        async with self._db.acquire() as conn:
            await conn.execute(
                "INSERT INTO policy_bundles (tenant_id, version_id, label, format, source, "
                "resource_kinds, quotas, test_count, create_principal, created_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
                "ON CONFLICT (tenant_id, version_id) DO NOTHING",
                tenant_id,
                bundle.version_id,
                bundle.label,
                bundle.format,
                bundle.source,
                list(bundle.resource_kinds),
                list(bundle.quotas),
                bundle.test_count,
                bundle.create_principal,
                datetime.fromtimestamp(bundle.create_time, UTC),
            )
        return await self.get(tenant_id, bundle.version_id)

    async def get(self, tenant_id: str, version_id: str) -> StoredBundle:
        """One version with its source; BundleNotFound if the tenant has no such version."""
        async with self._db.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS}, b.source, b.version_id = {_ACTIVE} AS active "
                "FROM policy_bundles b WHERE b.tenant_id = $1 AND b.version_id = $2",
                tenant_id,
                version_id,
            )
        if row is None:
            raise BundleNotFound()
        return _bundle(row, source=True)

    async def active(self, tenant_id: str) -> StoredBundle | None:
        """The active version with its source, or None when nothing was ever activated."""
        async with self._db.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS}, b.source FROM policy_bundles b "
                f"WHERE b.tenant_id = $1 AND b.version_id = {_ACTIVE}",
                tenant_id,
            )
        return None if row is None else _bundle(row, source=True, active=True)

    async def list(
        self, tenant_id: str, limit: int, after: tuple[float, str] | None
    ) -> list[StoredBundle]:
        """Versions newest first (by creation time, then id), after the `after` position."""
        start = datetime.fromtimestamp(after[0], UTC) if after else None
        async with self._db.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS}, b.version_id = {_ACTIVE} AS active "
                "FROM policy_bundles b WHERE b.tenant_id = $1 "
                "AND ($2::timestamptz IS NULL OR (b.created_at, b.version_id) < ($2, $3)) "
                "ORDER BY b.created_at DESC, b.version_id DESC LIMIT $4",
                tenant_id,
                start,
                after[1] if after else "",
                limit,
            )
        return [_bundle(r) for r in rows]

    async def activate(self, tenant_id: str, version_id: str, principal: str, now: float) -> None:
        """Push an activation; BundleNotFound if the version does not exist."""
        async with self._db.transaction() as conn:
            await _lock(conn, tenant_id)
            try:
                await conn.execute(
                    "INSERT INTO policy_activations "
                    "(tenant_id, version_id, activated_by, activated_at) VALUES ($1, $2, $3, $4)",
                    tenant_id,
                    version_id,
                    principal,
                    datetime.fromtimestamp(now, UTC),
                )
            except asyncpg.ForeignKeyViolationError:
                raise BundleNotFound() from None

    async def rollback(self, tenant_id: str, now: float) -> str | None:
        """Undo the newest live activation; the version active again, or None (and nothing
        changed) when there is no earlier live activation to return to."""
        async with self._db.transaction() as conn:
            await _lock(conn, tenant_id)
            rows = await conn.fetch(
                "SELECT id, version_id FROM policy_activations "
                "WHERE tenant_id = $1 AND undone_at IS NULL ORDER BY id DESC LIMIT 2",
                tenant_id,
            )
            if len(rows) < 2:
                return None
            await conn.execute(
                "UPDATE policy_activations SET undone_at = $2 WHERE id = $1",
                rows[0]["id"],
                datetime.fromtimestamp(now, UTC),
            )
        return str(rows[1]["version_id"])


async def _lock(conn: asyncpg.Connection, tenant_id: str) -> None:
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('policy:' || $1, 0))", tenant_id
    )
