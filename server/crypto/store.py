"""PostgreSQL store of the crypto feature: the only place its SQL lives.

Every query is scoped by tenant: it names the tenant, or — for a key's versions, which have no
tenant column — joins the key row and names the tenant there, or works on a key row it locked
by (tenant, name) earlier in the same transaction. The exceptions are deliberate system-wide
jobs: the sweeper's `due_rotations` and `destroy_due`, and root-key rotation's
`keks_not_under`. Driver errors become domain errors here, by exception class.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from server.crypto.model import Algorithm, Key, KeyPatch, KeyVersion, Purpose, VersionState
from server.db import Database
from server.errors import AlreadyExists, EtagMismatch, FailedPrecondition, NotFound


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


class KeyNotFound(NotFound):
    default_message = "key not found"


class KeyVersionNotFound(NotFound):
    default_message = "key version not found"


_KEY_COLUMNS = """id, tenant_id, name, purpose, algorithm, primary_version,
    min_decryption_version, rotation_period, next_rotation_at, labels, revision,
    created_at, updated_at"""


class PgKeyStore:
    """Keys, versions and tenant KEKs in PostgreSQL."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # --- tenant KEKs ------------------------------------------------------------------------

    async def get_kek(self, tenant_id: str) -> tuple[str, bytes] | None:
        async with self._db.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT root_key_id, wrapped_kek FROM crypto_tenant_keks WHERE tenant_id = $1",
                tenant_id,
            )
        return None if row is None else (row["root_key_id"], bytes(row["wrapped_kek"]))

    async def insert_kek(self, tenant_id: str, root_id: str, wrapped: bytes) -> tuple[str, bytes]:
        """Store the tenant's KEK unless another process won the race; return the stored one."""
        async with self._db.acquire() as conn:
            await conn.execute(
                "INSERT INTO crypto_tenant_keks (tenant_id, root_key_id, wrapped_kek) "
                "VALUES ($1, $2, $3) ON CONFLICT (tenant_id) DO NOTHING",
                tenant_id,
                root_id,
                wrapped,
            )
        stored = await self.get_kek(tenant_id)
        assert stored is not None
        return stored

    async def keks_not_under(self, root_id: str) -> list[tuple[str, str, bytes]]:
        async with self._db.acquire() as conn:
            rows = await conn.fetch(
                "SELECT tenant_id, root_key_id, wrapped_kek FROM crypto_tenant_keks "
                "WHERE root_key_id <> $1",
                root_id,
            )
        return [(r["tenant_id"], r["root_key_id"], bytes(r["wrapped_kek"])) for r in rows]

    async def rewrap_kek(self, tenant_id: str, old_root: str, root_id: str, wrapped: bytes) -> bool:
        async with self._db.acquire() as conn:
            status = await conn.execute(
                "UPDATE crypto_tenant_keks SET root_key_id = $3, wrapped_kek = $4, "
                "rewrapped_at = now() WHERE tenant_id = $1 AND root_key_id = $2",
                tenant_id,
                old_root,
                root_id,
                wrapped,
            )
        return bool(status.endswith(" 1"))

    # --- keys -------------------------------------------------------------------------------

    async def create_key(
        self, key: Key, wrapped_material: bytes, request_id: str | None
    ) -> tuple[Key, bool]:
        """Insert the key and its version 1; (key, created). A repeated request id returns the
        key it created before (exactly-once, even across a crash before the reply)."""
        try:
            async with self._db.transaction() as conn:
                await conn.execute(
                    f"INSERT INTO crypto_keys ({_KEY_COLUMNS}, request_id) "
                    "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)",
                    *_key_values(key),
                    request_id,
                )
                await conn.execute(
                    "INSERT INTO crypto_key_versions (key_id, version, state, wrapped_material,"
                    " created_at) VALUES ($1, 1, 'enabled', $2, $3)",
                    uuid.UUID(key.key_id),
                    wrapped_material,
                    _ts(key.created_at),
                )
        except asyncpg.UniqueViolationError:
            # Either constraint may fire first; a known request id always means "done before".
            existing = request_id and await self.get_by_request_id(key.tenant_id, request_id)
            if existing:
                return existing, False
            raise AlreadyExists(f"a key named {key.name!r} already exists") from None
        return await self.require(key.tenant_id, key.name), True

    async def get_by_request_id(self, tenant_id: str, request_id: str) -> Key | None:
        async with self._db.acquire() as conn:
            name = await conn.fetchval(
                "SELECT name FROM crypto_keys WHERE tenant_id = $1 AND request_id = $2",
                tenant_id,
                request_id,
            )
        return None if name is None else await self.get(tenant_id, name)

    async def get(self, tenant_id: str, name: str) -> Key | None:
        async with self._db.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_KEY_COLUMNS} FROM crypto_keys WHERE tenant_id = $1 AND name = $2",
                tenant_id,
                name,
            )
            if row is None:
                return None
            versions = await conn.fetch(
                "SELECT v.version, v.state, v.created_at, v.destroy_at, v.usage "
                "FROM crypto_key_versions v JOIN crypto_keys k ON k.id = v.key_id "
                "WHERE k.tenant_id = $1 AND v.key_id = $2 ORDER BY v.version",
                tenant_id,
                row["id"],
            )
        return _key(row, versions)

    async def require(self, tenant_id: str, name: str) -> Key:
        key = await self.get(tenant_id, name)
        if key is None:
            raise KeyNotFound(metadata={"name": name})
        return key

    async def list_keys(self, tenant_id: str, after: str, limit: int) -> list[Key]:
        async with self._db.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_KEY_COLUMNS} FROM crypto_keys "
                "WHERE tenant_id = $1 AND name > $2 ORDER BY name LIMIT $3",
                tenant_id,
                after,
                limit,
            )
        return [_key(row, ()) for row in rows]

    async def material(self, tenant_id: str, key_id: str, version: int) -> bytes | None:
        async with self._db.acquire() as conn:
            value = await conn.fetchval(
                "SELECT v.wrapped_material FROM crypto_key_versions v "
                "JOIN crypto_keys k ON k.id = v.key_id "
                "WHERE k.tenant_id = $1 AND v.key_id = $2 AND v.version = $3",
                tenant_id,
                uuid.UUID(key_id),
                version,
            )
        return None if value is None else bytes(value)

    async def update(
        self, tenant_id: str, name: str, patch: KeyPatch, revision: int | None, now: float
    ) -> Key:
        async with self._db.transaction() as conn:
            row = await _lock_key(conn, tenant_id, name)
            if revision is not None and row["revision"] != revision:
                raise EtagMismatch()
            labels = row["labels"] if patch.labels is None else json.dumps(patch.labels)
            period, next_at = _rotation(row, patch, now)
            minimum = patch.min_decryption_version or row["min_decryption_version"]
            if minimum > row["primary_version"]:
                raise FailedPrecondition(
                    "min_decryption_version cannot exceed the primary version",
                    metadata={"primary_version": str(row["primary_version"])},
                )
            await conn.execute(
                "UPDATE crypto_keys SET labels = $2, rotation_period = $3, next_rotation_at = $4,"
                " min_decryption_version = $5, revision = revision + 1, updated_at = $6 "
                "WHERE id = $1 AND tenant_id = $7",
                row["id"],
                labels,
                period,
                _ts(next_at),
                minimum,
                _ts(now),
                tenant_id,
            )
        return await self.require(tenant_id, name)

    async def add_version(
        self, tenant_id: str, name: str, wrap: Any, now: float, only_if_due: bool = False
    ) -> Key | None:
        """Add version max+1 as primary. `wrap(key_id, version)` returns its wrapped material.
        With `only_if_due`, do nothing unless the key's automatic rotation is due."""
        async with self._db.transaction() as conn:
            row = await _lock_key(conn, tenant_id, name)
            next_at = _epoch(row["next_rotation_at"])
            due = next_at is not None and next_at <= now
            if only_if_due and not due:
                return None
            version = await conn.fetchval(
                "SELECT max(version) + 1 FROM crypto_key_versions WHERE key_id = $1", row["id"]
            )
            await conn.execute(
                "INSERT INTO crypto_key_versions (key_id, version, state, wrapped_material, "
                "created_at) VALUES ($1, $2, 'enabled', $3, $4)",
                row["id"],
                version,
                await wrap(str(row["id"]), version),
                _ts(now),
            )
            period = row["rotation_period"]
            await conn.execute(
                "UPDATE crypto_keys SET primary_version = $2, revision = revision + 1, "
                "updated_at = $3, next_rotation_at = $4 WHERE id = $1 AND tenant_id = $5",
                row["id"],
                version,
                _ts(now),
                _ts(now + period) if period else None,
                tenant_id,
            )
        return await self.require(tenant_id, name)

    async def set_state(
        self,
        tenant_id: str,
        name: str,
        version: int,
        allowed: Sequence[VersionState],
        state: VersionState,
        now: float,
        destroy_at: float | None = None,
    ) -> Key:
        async with self._db.transaction() as conn:
            row = await _lock_key(conn, tenant_id, name)
            current = await conn.fetchval(
                "SELECT state FROM crypto_key_versions WHERE key_id = $1 AND version = $2",
                row["id"],
                version,
            )
            if current is None:
                raise KeyVersionNotFound(metadata={"name": name, "version": str(version)})
            if version == row["primary_version"]:
                raise FailedPrecondition(
                    "the primary version cannot change state; rotate first",
                    metadata={"state": current},
                )
            if VersionState(current) not in allowed:
                raise FailedPrecondition(f"key version is {current}", metadata={"state": current})
            await conn.execute(
                "UPDATE crypto_key_versions SET state = $3, destroy_at = $4 "
                "WHERE key_id = $1 AND version = $2",
                row["id"],
                version,
                state.value,
                _ts(destroy_at),
            )
            await conn.execute(
                "UPDATE crypto_keys SET revision = revision + 1, updated_at = $2 "
                "WHERE id = $1 AND tenant_id = $3",
                row["id"],
                _ts(now),
                tenant_id,
            )
        return await self.require(tenant_id, name)

    # --- maintenance ------------------------------------------------------------------------

    async def due_rotations(self, now: float) -> list[tuple[str, str]]:
        async with self._db.acquire() as conn:
            rows = await conn.fetch(
                "SELECT tenant_id, name FROM crypto_keys WHERE next_rotation_at <= $1",
                _ts(now),
            )
        return [(r["tenant_id"], r["name"]) for r in rows]

    async def destroy_all(self, tenant_id: str, name: str, now: float) -> int:
        """Erase the material of every version of a key at once (crypto-shredding); returns how
        many versions were erased now (0 when the key was already shredded or is unknown)."""
        async with self._db.transaction() as conn:
            row = await conn.fetchrow(
                "SELECT id FROM crypto_keys WHERE tenant_id = $1 AND name = $2 FOR UPDATE",
                tenant_id,
                name,
            )
            if row is None:
                return 0
            status = await conn.execute(
                "UPDATE crypto_key_versions SET state = 'destroyed', wrapped_material = NULL,"
                " destroy_at = NULL, destroyed_at = $2 WHERE key_id = $1 AND state <> 'destroyed'",
                row["id"],
                _ts(now),
            )
            await conn.execute(
                "UPDATE crypto_keys SET revision = revision + 1, updated_at = $2 "
                "WHERE id = $1 AND tenant_id = $3",
                row["id"],
                _ts(now),
                tenant_id,
            )
        return int(status.split()[-1])

    async def destroy_due(self, now: float) -> list[tuple[str, str, int]]:
        """Erase the material of versions whose scheduled destruction is due."""
        async with self._db.acquire() as conn:
            rows = await conn.fetch(
                "UPDATE crypto_key_versions v SET state = 'destroyed', wrapped_material = NULL,"
                " destroyed_at = $1 FROM crypto_keys k WHERE v.key_id = k.id AND "
                "v.state = 'destroy_scheduled' AND v.destroy_at <= $1 "
                "RETURNING k.tenant_id, k.name, v.version",
                _ts(now),
            )
        return [(r["tenant_id"], r["name"], r["version"]) for r in rows]

    async def add_usage(self, counts: dict[tuple[str, str, int], dict[str, int]]) -> None:
        """Add coalesced per-version operation counts, keyed by (tenant, key id, version)."""
        async with self._db.transaction() as conn:
            for (tenant_id, key_id, version), kinds in counts.items():
                await conn.execute(
                    "UPDATE crypto_key_versions v SET usage = (SELECT jsonb_object_agg(n, "
                    "COALESCE((v.usage->>n)::bigint, 0) + COALESCE((($3::jsonb)->>n)::bigint, 0))"
                    " FROM jsonb_object_keys(v.usage || $3::jsonb) AS n) FROM crypto_keys k "
                    "WHERE k.id = v.key_id AND k.tenant_id = $4 AND v.key_id = $1 "
                    "AND v.version = $2",
                    uuid.UUID(key_id),
                    version,
                    json.dumps(kinds),
                    tenant_id,
                )


async def _lock_key(conn: asyncpg.Connection, tenant_id: str, name: str) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT id, labels, rotation_period, next_rotation_at, min_decryption_version, "
        "primary_version, revision FROM crypto_keys WHERE tenant_id = $1 AND name = $2 "
        "FOR UPDATE",
        tenant_id,
        name,
    )
    if row is None:
        raise KeyNotFound(metadata={"name": name})
    return row


def _rotation(
    row: asyncpg.Record, patch: KeyPatch, now: float
) -> tuple[float | None, float | None]:
    if patch.clear_rotation:
        return None, None
    if patch.rotation_period is not None:
        return patch.rotation_period, now + patch.rotation_period
    return row["rotation_period"], _epoch(row["next_rotation_at"])


def _key_values(key: Key) -> tuple[Any, ...]:
    return (
        uuid.UUID(key.key_id),
        key.tenant_id,
        key.name,
        key.purpose.value,
        key.algorithm.value,
        key.primary_version,
        key.min_decryption_version,
        key.rotation_period,
        _ts(key.next_rotation_at),
        json.dumps(key.labels),
        key.revision,
        _ts(key.created_at),
        _ts(key.updated_at),
    )


def _key(row: asyncpg.Record, versions: Sequence[asyncpg.Record]) -> Key:
    return Key(
        tenant_id=row["tenant_id"],
        key_id=str(row["id"]),
        name=row["name"],
        purpose=Purpose(row["purpose"]),
        algorithm=Algorithm(row["algorithm"]),
        primary_version=row["primary_version"],
        min_decryption_version=row["min_decryption_version"],
        rotation_period=row["rotation_period"],
        next_rotation_at=_epoch(row["next_rotation_at"]),
        labels=json.loads(row["labels"]),
        revision=row["revision"],
        created_at=row["created_at"].timestamp(),
        updated_at=row["updated_at"].timestamp(),
        versions=tuple(
            KeyVersion(
                v["version"],
                VersionState(v["state"]),
                v["created_at"].timestamp(),
                _epoch(v["destroy_at"]),
                json.loads(v["usage"]),
            )
            for v in versions
        ),
    )
