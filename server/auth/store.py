"""PostgreSQL store of the Auth feature: tenants, principals, sessions, refresh tokens."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

from server.actor import PrincipalType
from server.auth.model import ApiKeyRecord, AuthSession, Principal, Tenant
from server.db import Database
from server.errors import AlreadyExists, EtagMismatch, NotFound


def _ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


class RefreshOutcome:
    """What spending a refresh token found."""

    SPENT = "spent"  # it was valid and is now used
    REUSED = "reused"  # it had been used before
    INVALID = "invalid"  # unknown, expired, or its session is revoked or expired


class PgAuthStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create_tenant(self, tenant_id: str, name: str) -> Tenant:
        try:
            async with self._db.acquire() as conn:
                await conn.execute(
                    "INSERT INTO tenants (id, name) VALUES ($1, $2)", tenant_id, name
                )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"tenant {name!r} already exists") from None
        return Tenant(tenant_id, name)

    async def tenant_by_name(self, name: str) -> Tenant | None:
        async with self._db.acquire() as conn:
            row = await conn.fetchrow("SELECT id, name FROM tenants WHERE name = $1", name)
        return None if row is None else Tenant(row["id"], row["name"])

    async def tenant(self, tenant_id: str) -> tuple[Tenant, str, dict[str, object]] | None:
        """The tenant, its display name and its settings."""
        async with self._db.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT id, name, display_name, settings FROM tenants WHERE id = $1", tenant_id
            )
        if row is None:
            return None
        return Tenant(row["id"], row["name"]), row["display_name"], json.loads(row["settings"])

    async def update_tenant(
        self, tenant_id: str, display_name: str | None, settings: dict[str, object]
    ) -> None:
        async with self._db.acquire() as conn:
            await conn.execute(
                "UPDATE tenants SET display_name = COALESCE($2, display_name), "
                "settings = settings || $3::jsonb, updated_at = now() WHERE id = $1",
                tenant_id,
                display_name,
                json.dumps(settings),
            )

    async def count_tenants(self) -> int:
        async with self._db.acquire() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM tenants"))

    async def create_user(
        self, tenant_id: str, email: str, password_hash: str, roles: list[str], name: str
    ) -> Principal:
        principal_id = str(uuid.uuid4())
        try:
            async with self._db.acquire() as conn:
                await conn.execute(
                    "INSERT INTO principals (id, tenant_id, type, email, display_name, "
                    "password_hash, roles) VALUES ($1, $2, 'user', $3, $4, $5, $6)",
                    uuid.UUID(principal_id),
                    tenant_id,
                    email,
                    name,
                    password_hash,
                    roles,
                )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"a user with email {email!r} already exists") from None
        found = await self.principal(tenant_id, principal_id)
        assert found is not None
        return found

    async def user_by_email(self, tenant_id: str, email: str) -> Principal | None:
        async with self._db.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_PRINCIPAL} FROM principals WHERE tenant_id = $1 "
                "AND lower(email) = lower($2) AND type = 'user'",
                tenant_id,
                email,
            )
        return None if row is None else _principal(row)

    async def principal(self, tenant_id: str, principal_id: str) -> Principal | None:
        if not _is_uuid(principal_id):
            return None
        async with self._db.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_PRINCIPAL} FROM principals WHERE tenant_id = $1 AND id = $2",
                tenant_id,
                uuid.UUID(principal_id),
            )
        return None if row is None else _principal(row)

    async def principals(self, tenant_id: str, principal_ids: Sequence[str]) -> list[Principal]:
        """The tenant's principals among `principal_ids` (ids that are not UUIDs match none)."""
        keys = [uuid.UUID(p) for p in principal_ids if _is_uuid(p)]
        if not keys:
            return []
        async with self._db.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_PRINCIPAL} FROM principals "
                "WHERE tenant_id = $1 AND id = ANY($2::uuid[])",
                tenant_id,
                keys,
            )
        return [_principal(row) for row in rows]

    # --- agents -----------------------------------------------------------------------------

    async def create_agent(
        self,
        kind: PrincipalType,
        tenant_id: str,
        owner_id: str,
        display_name: str,
        purpose: str,
        roles: list[str],
        scopes: list[str] | None,
        expires_at: float | None,
        request_id: str,
    ) -> Principal:
        """Exactly once per request id: a retry returns the agent the first call created."""
        agent_id = uuid.uuid4()
        async with self._db.acquire() as conn:
            created = await conn.fetchval(
                "INSERT INTO principals (id, tenant_id, type, display_name, roles, scopes, "
                "owner_id, purpose, expires_at, request_id) VALUES ($1, $2, $10, $3, $4, "
                "$5, $6, $7, $8, $9) ON CONFLICT (tenant_id, request_id) DO NOTHING RETURNING id",
                agent_id,
                tenant_id,
                display_name,
                roles,
                scopes,
                uuid.UUID(owner_id),
                purpose,
                None if expires_at is None else _ts(expires_at),
                request_id,
                kind.value,
            )
            if created is None:
                created = await conn.fetchval(
                    "SELECT id FROM principals WHERE tenant_id = $1 AND request_id = $2",
                    tenant_id,
                    request_id,
                )
        found = await self.principal(tenant_id, str(created))
        assert found is not None
        return found

    async def list_agents(
        self, tenant_id: str, kinds: tuple[PrincipalType, ...], after: str, limit: int
    ) -> list[Principal]:
        async with self._db.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_PRINCIPAL} FROM principals WHERE tenant_id = $1 AND type = ANY($2) "
                "AND id::text > $3 ORDER BY id::text LIMIT $4",
                tenant_id,
                [k.value for k in kinds],
                after,
                limit,
            )
        return [_principal(row) for row in rows]

    async def list_principals(
        self, tenant_id: str, kind: PrincipalType, after: str, limit: int
    ) -> list[Principal]:
        async with self._db.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_PRINCIPAL} FROM principals WHERE tenant_id = $1 AND type = $2 "
                "AND id::text > $3 ORDER BY id::text LIMIT $4",
                tenant_id,
                kind.value,
                after,
                limit,
            )
        return [_principal(row) for row in rows]

    async def update_principal(
        self,
        tenant_id: str,
        principal_id: str,
        kind: PrincipalType,
        changes: dict[str, object],
        revision: int | None,
    ) -> Principal:
        """Apply whitelisted column changes under a row lock, checking the etag's revision."""
        columns = [c for c in changes if c in _MUTABLE_COLUMNS]
        async with self._db.transaction() as conn:
            current = await conn.fetchval(
                "SELECT revision FROM principals WHERE tenant_id = $1 AND id = $2 AND type = $3 "
                "FOR UPDATE",
                tenant_id,
                uuid.UUID(principal_id),
                kind.value,
            )
            if current is None:
                raise NotFound(f"{kind.value.replace('_', ' ')} not found")
            if revision is not None and current != revision:
                raise EtagMismatch()
            sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(columns, start=3))
            values = [_column_value(c, changes[c]) for c in columns]
            await conn.execute(
                f"UPDATE principals SET {sets}{', ' if sets else ''}revision = revision + 1, "
                "updated_at = now() WHERE tenant_id = $1 AND id = $2",
                tenant_id,
                uuid.UUID(principal_id),
                *values,
            )
        found = await self.principal(tenant_id, principal_id)
        assert found is not None
        return found

    async def set_disabled(self, tenant_id: str, principal_id: str, disabled: bool) -> None:
        async with self._db.acquire() as conn:
            await conn.execute(
                "UPDATE principals SET disabled = $3, revision = revision + 1, "
                "updated_at = now() WHERE tenant_id = $1 AND id = $2",
                tenant_id,
                uuid.UUID(principal_id),
                disabled,
            )

    # --- API keys ---------------------------------------------------------------------------

    async def insert_api_key(self, key: ApiKeyRecord, request_id: str) -> ApiKeyRecord | None:
        """Store a new key; None if this request id already created one (the secret of that
        one was shown to the first call and cannot be shown again)."""
        async with self._db.acquire() as conn:
            inserted = await conn.fetchval(
                "INSERT INTO api_keys (id, tenant_id, principal_id, mac, mac_version, scopes, "
                "display_name, created_at, expires_at, request_id) VALUES ($1, $2, $3, $4, $5, "
                "$6, $7, $8, $9, $10) ON CONFLICT (tenant_id, request_id) DO NOTHING RETURNING id",
                key.id,
                key.tenant_id,
                uuid.UUID(key.principal_id),
                key.mac,
                key.mac_version,
                None if key.scopes is None else list(key.scopes),
                key.display_name,
                _ts(key.created_at),
                _ts(key.expires_at),
                request_id,
            )
        return key if inserted else None

    async def api_key(self, key_id: str) -> ApiKeyRecord | None:
        async with self._db.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_API_KEY} FROM api_keys WHERE id = $1",
                key_id,
            )
        return None if row is None else _api_key(row)

    async def api_keys(self, tenant_id: str, principal_id: str) -> list[ApiKeyRecord]:
        async with self._db.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_API_KEY} FROM api_keys WHERE tenant_id = $1 AND principal_id = $2 "
                "ORDER BY created_at DESC",
                tenant_id,
                uuid.UUID(principal_id),
            )
        return [_api_key(row) for row in rows]

    async def revoke_api_key(self, tenant_id: str, key_id: str, now: float) -> ApiKeyRecord | None:
        async with self._db.acquire() as conn:
            row = await conn.fetchrow(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $3) "
                f"WHERE tenant_id = $1 AND id = $2 RETURNING {_API_KEY}",
                tenant_id,
                key_id,
                _ts(now),
            )
        return None if row is None else _api_key(row)

    async def shorten_api_key(self, key_id: str, expires_at: float) -> ApiKeyRecord | None:
        async with self._db.acquire() as conn:
            row = await conn.fetchrow(
                "UPDATE api_keys SET expires_at = LEAST(expires_at, $2) WHERE id = $1 "
                f"RETURNING {_API_KEY}",
                key_id,
                _ts(expires_at),
            )
        return None if row is None else _api_key(row)

    async def touch(self, api_keys: dict[str, float], principals: dict[str, float]) -> None:
        """Coalesced last-use writes."""
        async with self._db.acquire() as conn:
            for key_id, when in api_keys.items():
                await conn.execute(
                    "UPDATE api_keys SET last_used_at = $2 WHERE id = $1", key_id, _ts(when)
                )
            for principal_id, when in principals.items():
                await conn.execute(
                    "UPDATE principals SET last_seen_at = $2 WHERE id = $1",
                    uuid.UUID(principal_id),
                    _ts(when),
                )

    # --- invitations ------------------------------------------------------------------------

    async def create_invitation(
        self,
        tenant_id: str,
        email: str,
        role: str,
        token_hash: bytes,
        invited_by: str,
        now: float,
        expires_at: float,
        request_id: str,
    ) -> str | None:
        """The new invitation's id; None if this request id already created one."""
        async with self._db.acquire() as conn:
            created = await conn.fetchval(
                "INSERT INTO invitations (id, tenant_id, email, role, token_hash, invited_by, "
                "created_at, expires_at, request_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                " ON CONFLICT (tenant_id, request_id) DO NOTHING RETURNING id",
                uuid.uuid4(),
                tenant_id,
                email,
                role,
                token_hash,
                uuid.UUID(invited_by),
                _ts(now),
                _ts(expires_at),
                request_id,
            )
        return None if created is None else str(created)

    async def revoke_invitation(self, tenant_id: str, invitation_id: str, now: float) -> bool:
        if not _is_uuid(invitation_id):
            return False
        async with self._db.acquire() as conn:
            done = await conn.fetchval(
                "UPDATE invitations SET revoked_at = COALESCE(revoked_at, $3) "
                "WHERE tenant_id = $1 AND id = $2 RETURNING true",
                tenant_id,
                uuid.UUID(invitation_id),
                _ts(now),
            )
        return bool(done)

    async def accept_invitation(
        self, token_hash: bytes, now: float, password_hash: str, display_name: str
    ) -> tuple[str, Principal | None]:
        """Spend the invitation and create its user in one transaction: ("ok", user), or
        (why not, None) with why in {unknown, expired, used, revoked}."""
        async with self._db.transaction() as conn:
            row = await conn.fetchrow(
                "SELECT id, tenant_id, email, role, expires_at, accepted_at, revoked_at "
                "FROM invitations WHERE token_hash = $1 FOR UPDATE",
                token_hash,
            )
            problem = _invitation_problem(row, now)
            if problem:
                return problem, None
            principal_id = uuid.uuid4()
            try:
                await conn.execute(
                    "INSERT INTO principals (id, tenant_id, type, email, display_name, "
                    "password_hash, roles) VALUES ($1, $2, 'user', $3, $4, $5, $6)",
                    principal_id,
                    row["tenant_id"],
                    row["email"],
                    display_name,
                    password_hash,
                    [row["role"]],
                )
            except asyncpg.UniqueViolationError:
                raise AlreadyExists("a user with this email already exists") from None
            await conn.execute(
                "UPDATE invitations SET accepted_at = $2 WHERE id = $1", row["id"], _ts(now)
            )
        return "ok", await self.principal(row["tenant_id"], str(principal_id))

    async def tenant_name(self, tenant_id: str) -> str:
        async with self._db.acquire() as conn:
            return str(await conn.fetchval("SELECT name FROM tenants WHERE id = $1", tenant_id))

    # --- MFA --------------------------------------------------------------------------------

    async def mfa_secrets(self, principal_id: str) -> tuple[bytes | None, bytes | None]:
        """(active secret, pending secret), both encrypted."""
        async with self._db.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT mfa_secret, mfa_pending FROM principals WHERE id = $1",
                uuid.UUID(principal_id),
            )
        if row is None:
            return None, None
        return _bytes(row["mfa_secret"]), _bytes(row["mfa_pending"])

    async def set_mfa_pending(self, principal_id: str, encrypted: bytes) -> None:
        async with self._db.acquire() as conn:
            await conn.execute(
                "UPDATE principals SET mfa_pending = $2 WHERE id = $1",
                uuid.UUID(principal_id),
                encrypted,
            )

    async def enable_mfa(self, principal_id: str, code_hashes: list[bytes]) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE principals SET mfa_secret = mfa_pending, mfa_pending = NULL, "
                "mfa_enabled = true WHERE id = $1",
                uuid.UUID(principal_id),
            )
            await conn.execute(
                "DELETE FROM mfa_recovery_codes WHERE principal_id = $1", uuid.UUID(principal_id)
            )
            await conn.executemany(
                "INSERT INTO mfa_recovery_codes (principal_id, code_hash) VALUES ($1, $2)",
                [(uuid.UUID(principal_id), h) for h in code_hashes],
            )

    async def disable_mfa(self, principal_id: str) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE principals SET mfa_secret = NULL, mfa_pending = NULL, "
                "mfa_enabled = false WHERE id = $1",
                uuid.UUID(principal_id),
            )
            await conn.execute(
                "DELETE FROM mfa_recovery_codes WHERE principal_id = $1", uuid.UUID(principal_id)
            )

    async def use_recovery_code(self, principal_id: str, code_hash: bytes, now: float) -> bool:
        async with self._db.acquire() as conn:
            used = await conn.fetchval(
                "UPDATE mfa_recovery_codes SET used_at = $3 WHERE principal_id = $1 AND "
                "code_hash = $2 AND used_at IS NULL RETURNING true",
                uuid.UUID(principal_id),
                code_hash,
                _ts(now),
            )
        return bool(used)

    async def create_session(
        self,
        tenant_id: str,
        principal_id: str,
        now: float,
        expires_at: float,
        refresh_hash: bytes,
        refresh_expires_at: float,
    ) -> str:
        session_id = str(uuid.uuid4())
        async with self._db.transaction() as conn:
            await conn.execute(
                "INSERT INTO auth_sessions (id, tenant_id, principal_id, created_at, expires_at)"
                " VALUES ($1, $2, $3, $4, $5)",
                uuid.UUID(session_id),
                tenant_id,
                uuid.UUID(principal_id),
                _ts(now),
                _ts(expires_at),
            )
            await conn.execute(
                "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at) "
                "VALUES ($1, $2, $3, $4)",
                refresh_hash,
                uuid.UUID(session_id),
                _ts(now),
                _ts(refresh_expires_at),
            )
            await conn.execute(
                "UPDATE principals SET last_seen_at = $2 WHERE id = $1",
                uuid.UUID(principal_id),
                _ts(now),
            )
        return session_id

    async def spend_refresh(
        self, token_hash: bytes, now: float, new_hash: bytes, new_expires_at: float
    ) -> tuple[str, AuthSession | None]:
        """Atomically spend a refresh token and store its successor (same session)."""
        async with self._db.transaction() as conn:
            row = await conn.fetchrow(
                "UPDATE refresh_tokens t SET used_at = $2 FROM auth_sessions s "
                "WHERE t.token_hash = $1 AND t.used_at IS NULL AND t.expires_at > $2 "
                "AND s.id = t.session_id AND s.revoked_at IS NULL AND s.expires_at > $2 "
                f"RETURNING {_SESSION_RETURNING}",
                token_hash,
                _ts(now),
            )
            if row is None:
                used = await conn.fetchval(
                    "SELECT session_id FROM refresh_tokens WHERE token_hash = $1 "
                    "AND used_at IS NOT NULL",
                    token_hash,
                )
                return (RefreshOutcome.REUSED if used else RefreshOutcome.INVALID), (
                    await self._session(conn, used) if used else None
                )
            await conn.execute(
                "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at) "
                "VALUES ($1, $2, $3, $4)",
                new_hash,
                row["id"],
                _ts(now),
                _ts(new_expires_at),
            )
            await conn.execute(
                "UPDATE auth_sessions SET last_refresh_at = $2 WHERE id = $1",
                row["id"],
                _ts(now),
            )
        return RefreshOutcome.SPENT, _session(row)

    async def _session(self, conn: asyncpg.Connection, session_id: uuid.UUID) -> AuthSession:
        row = await conn.fetchrow(
            f"SELECT {_SESSION_COLUMNS} FROM auth_sessions s WHERE s.id = $1",
            session_id,
        )
        return _session(row)

    async def revoke_sessions(
        self, tenant_id: str, principal_id: str | None, now: float, session_id: str | None = None
    ) -> list[str]:
        """Revoke one session (or all) of a principal — one session of any principal of the
        tenant when `principal_id` is None (administration); return the ids revoked."""
        if principal_id is None and not session_id:
            raise ValueError("revoking every session of a tenant is not an operation")
        if principal_id is not None and not _is_uuid(principal_id):  # an external subject
            return []
        async with self._db.acquire() as conn:
            rows = await conn.fetch(
                "UPDATE auth_sessions SET revoked_at = $3 WHERE tenant_id = $1 AND "
                "($2::uuid IS NULL OR principal_id = $2) AND revoked_at IS NULL AND "
                "($4::uuid IS NULL OR id = $4) RETURNING id",
                tenant_id,
                uuid.UUID(principal_id) if principal_id is not None else None,
                _ts(now),
                uuid.UUID(session_id) if session_id else None,
            )
        return [str(row["id"]) for row in rows]

    async def revoke_session_by_id(self, session_id: str, now: float) -> None:
        async with self._db.acquire() as conn:
            await conn.execute(
                "UPDATE auth_sessions SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                uuid.UUID(session_id),
                _ts(now),
            )

    async def sessions(
        self, tenant_id: str, principal_id: str, now: float, limit: int, after: str = ""
    ) -> list[AuthSession]:
        """A principal's active sessions, newest first; `after` is the last session id of the
        previous page (keyset: (created_at, id) strictly older than it)."""
        if not _is_uuid(principal_id) or (after and not _is_uuid(after)):
            return []
        async with self._db.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_SESSION_COLUMNS} FROM auth_sessions s WHERE s.tenant_id = $1 AND "
                "s.principal_id = $2 AND s.revoked_at IS NULL AND s.expires_at > $3 AND "
                "($4::uuid IS NULL OR (s.created_at, s.id) < (SELECT a.created_at, a.id FROM "
                "auth_sessions a WHERE a.tenant_id = $1 AND a.id = $4)) "
                "ORDER BY s.created_at DESC, s.id DESC LIMIT $5",
                tenant_id,
                uuid.UUID(principal_id),
                _ts(now),
                uuid.UUID(after) if after else None,
                limit,
            )
        return [_session(row) for row in rows]


_PRINCIPAL = (
    "id, tenant_id, type, email, display_name, roles, scopes, disabled, password_hash, "
    "owner_id, purpose, expires_at, last_seen_at, created_at, mfa_enabled, revision"
)
_API_KEY = (
    "id, tenant_id, principal_id, mac, mac_version, scopes, display_name, created_at, "
    "expires_at, revoked_at, last_used_at"
)
_SESSION_COLUMNS = (
    "s.id, s.tenant_id, s.principal_id, s.created_at, s.expires_at, s.last_refresh_at"
)
_SESSION_RETURNING = (
    "s.id, s.tenant_id, s.principal_id, s.created_at, s.expires_at, s.last_refresh_at"
)


_MUTABLE_COLUMNS = ("display_name", "purpose", "roles", "scopes", "expires_at", "disabled")


def _column_value(column: str, value: object) -> object:
    if column == "expires_at" and isinstance(value, float):
        return _ts(value)
    return value


def _invitation_problem(row: asyncpg.Record | None, now: float) -> str:
    if row is None:
        return "unknown"
    if row["revoked_at"] is not None:
        return "revoked"
    if row["accepted_at"] is not None:
        return "used"
    if row["expires_at"].timestamp() <= now:
        return "expired"
    return ""


def _bytes(value: bytes | None) -> bytes | None:
    return None if value is None else bytes(value)


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _principal(row: asyncpg.Record) -> Principal:
    return Principal(
        id=str(row["id"]),
        tenant_id=row["tenant_id"],
        type=PrincipalType(row["type"]),
        email=row["email"],
        display_name=row["display_name"],
        roles=tuple(row["roles"]),
        scopes=None if row["scopes"] is None else tuple(row["scopes"]),
        disabled=row["disabled"],
        password_hash=row["password_hash"],
        owner_id=None if row["owner_id"] is None else str(row["owner_id"]),
        purpose=row["purpose"],
        expires_at=_epoch(row["expires_at"]),
        last_seen_at=_epoch(row["last_seen_at"]),
        created_at=row["created_at"].timestamp(),
        mfa_enabled=row["mfa_enabled"],
        revision=row["revision"],
    )


def _api_key(row: asyncpg.Record) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=row["id"],
        tenant_id=row["tenant_id"],
        principal_id=str(row["principal_id"]),
        mac=bytes(row["mac"]),
        mac_version=row["mac_version"],
        scopes=None if row["scopes"] is None else tuple(row["scopes"]),
        display_name=row["display_name"],
        created_at=row["created_at"].timestamp(),
        expires_at=row["expires_at"].timestamp(),
        revoked_at=_epoch(row["revoked_at"]),
        last_used_at=_epoch(row["last_used_at"]),
    )


def _session(row: asyncpg.Record) -> AuthSession:
    return AuthSession(
        id=str(row["id"]),
        tenant_id=row["tenant_id"],
        principal_id=str(row["principal_id"]),
        created_at=row["created_at"].timestamp(),
        expires_at=row["expires_at"].timestamp(),
        last_refresh_at=_epoch(row["last_refresh_at"]),
    )
