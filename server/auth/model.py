"""Auth domain types (stdlib only)."""

from __future__ import annotations

from dataclasses import dataclass

from server import wire
from server.actor import PrincipalType

# Server-owned records live in tenants whose id starts with "_"; no token may name one.
SYSTEM_TENANT = "_system"
TOKEN_KEY = "auth-access-tokens"  # noqa: S105 - a key name, not a secret


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str


@dataclass(frozen=True)
class Principal:
    id: str
    tenant_id: str
    type: PrincipalType
    email: str | None
    display_name: str
    roles: tuple[str, ...]
    scopes: tuple[str, ...] | None
    disabled: bool
    password_hash: str | None = None
    owner_id: str | None = None
    purpose: str = ""
    expires_at: float | None = None
    last_seen_at: float | None = None
    created_at: float = 0.0
    mfa_enabled: bool = False
    revision: int = 1

    @property
    def etag(self) -> str:
        return wire.etag(self.id[:8], self.revision)


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key's stored form: never the secret, only its MAC."""

    id: str
    tenant_id: str
    principal_id: str
    mac: bytes
    mac_version: int
    scopes: tuple[str, ...] | None
    display_name: str
    created_at: float
    expires_at: float
    revoked_at: float | None
    last_used_at: float | None


@dataclass(frozen=True)
class AuthSession:
    id: str
    tenant_id: str
    principal_id: str
    created_at: float
    expires_at: float
    last_refresh_at: float | None


@dataclass(frozen=True)
class IssuedTokens:
    access_token: str
    access_expires_at: float
    refresh_token: str
    refresh_expires_at: float
    session_id: str
