"""API keys: `tp_<env>_<id>_<secret><checksum>`, shown once, stored only as an HMAC.

- `id` (16 hex) finds the row; `secret` (32 base62) is what proves possession; `checksum` (6
  base62, CRC-32 of everything before it) lets clients, secret scanners and this server
  recognise a mistyped or truncated key without a database read.
- The stored MAC is HMAC-SHA-256 of the secret under a MAC key of the Crypto keyring (tenant
  `_system`, key `api-key-mac`): the "pepper" is itself wrapped by the key hierarchy, survives
  root-key rotation, and can be rotated (each row records the MAC version it used).
- Verification results are cached in-process for `cache_ttl` seconds (keyed by a hash of the
  key); revocation and the agent kill switch still apply at once through the deny-list, which
  the authenticate layer consults on every call. Role changes of the owner apply within the
  cache TTL.
- `last_used_at` / `last_seen_at` are written at most once a minute per key (coalesced): uses
  are noted in memory and written by `flush` (every sweep interval); what is remembered for
  coalescing is bounded (entries older than a minute are dropped, at most 100 000 kept).
"""

from __future__ import annotations

import hashlib
import secrets
import string
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from server.actor import ActorContext, AuthMethod
from server.auth.model import SYSTEM_TENANT, ApiKeyRecord, Principal
from server.auth.store import PgAuthStore
from server.crypto.model import Algorithm, Key, Purpose
from server.errors import FieldViolation, InvalidArgument, SecretAlreadyShown
from server.permissions import ROLE_GRANTS, matches
from server.tokens import ApiKeyInvalid

MAC_KEY = "api-key-mac"
MAX_TTL = 90 * 86_400.0
_BASE62 = string.digits + string.ascii_letters
_TOUCH_EVERY = 60.0
_TOUCHED_LIMIT = 100_000  # keys remembered for coalescing; past it, old entries go


class MacKeys(Protocol):
    """The Crypto keyring's MAC API (KeyManager)."""

    async def mac(self, tenant_id: str, name: str, data: bytes) -> tuple[bytes, int]: ...
    async def verify_mac(
        self, tenant_id: str, name: str, data: bytes, tag: bytes, version: int
    ) -> bool: ...
    async def ensure_key(
        self, tenant_id: str, name: str, purpose: Purpose, algorithm: Algorithm | None = None
    ) -> Key: ...


@dataclass(frozen=True)
class ParsedKey:
    env: str
    id: str
    secret: str


def checksum(text: str) -> str:
    value = zlib.crc32(text.encode())
    digits = []
    for _ in range(6):
        value, digit = divmod(value, 62)
        digits.append(_BASE62[digit])
    return "".join(reversed(digits))


def format_key(env: str, key_id: str, secret: str) -> str:
    body = f"tp_{env}_{key_id}_{secret}"
    return body + checksum(body)


def parse_key(api_key: str) -> ParsedKey | None:
    """The key's parts, or None if it is not well-formed or its checksum does not match."""
    parts = api_key.split("_")
    if len(parts) != 4 or parts[0] != "tp" or len(parts[3]) != 38:
        return None
    secret, check = parts[3][:32], parts[3][32:]
    if checksum(api_key[: -len(check)]) != check:
        return None
    return ParsedKey(parts[1], parts[2], secret)


class ApiKeys:
    """Creation, listing, revocation and verification (the authenticate layer's API-key path)."""

    def __init__(
        self,
        store: PgAuthStore,
        keys: MacKeys,
        *,
        env: str = "live",
        cache_ttl: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._keys = keys
        self._env = env
        self._ttl = cache_ttl
        self._clock = clock
        self._verified: dict[bytes, tuple[float, ActorContext]] = {}
        self._touched: dict[str, float] = {}
        self._pending: tuple[dict[str, float], dict[str, float]] = ({}, {})

    async def start(self) -> None:
        await self._keys.ensure_key(SYSTEM_TENANT, MAC_KEY, Purpose.MAC)

    async def create(
        self,
        owner: Principal,
        scopes: Sequence[str],
        expires_at: float,
        display_name: str,
        request_id: str,
    ) -> tuple[str, ApiKeyRecord]:
        now = self._clock()
        _check_expiry(expires_at, now, await self._cap(owner.tenant_id))
        checked = _check_scopes(owner, scopes)
        key_id, secret = secrets.token_hex(8), _random(32)
        tag, version = await self._keys.mac(SYSTEM_TENANT, MAC_KEY, secret.encode())
        record = ApiKeyRecord(
            key_id,
            owner.tenant_id,
            owner.id,
            tag,
            version,
            checked,
            display_name[:128],
            now,
            expires_at,
            None,
            None,
        )
        stored = await self._store.insert_api_key(record, request_id)
        if stored is None:  # this request id created a key before: never show a secret twice
            raise SecretAlreadyShown(metadata={"request_id": request_id})
        return format_key(self._env, key_id, secret), stored

    async def _cap(self, tenant_id: str) -> float:
        """The tenant's maximum key lifetime (`api_key_max_ttl_days`, never above 90 days)."""
        found = await self._store.tenant(tenant_id)
        days = found[2].get("api_key_max_ttl_days", 90) if found else 90
        return min(MAX_TTL, float(days) * 86_400.0) if isinstance(days, int) else MAX_TTL

    async def rotate(
        self, owner: Principal, old: ApiKeyRecord, overlap: float, request_id: str
    ) -> tuple[str, ApiKeyRecord, ApiKeyRecord]:
        """A successor with the same scopes and lifetime; the old key ends after `overlap`."""
        overlap = overlap or 86_400.0
        if not 0 < overlap <= 7 * 86_400.0:
            raise InvalidArgument.fields(
                FieldViolation("overlap_seconds", "at most 7 days (604800)")
            )
        now = self._clock()
        lifetime = min(old.expires_at - old.created_at, await self._cap(owner.tenant_id))
        key, record = await self.create(
            owner, old.scopes or (), now + lifetime, old.display_name, request_id
        )
        previous = await self._store.shorten_api_key(old.id, now + overlap)
        assert previous is not None
        self._verified.clear()
        return key, record, previous

    async def list(self, owner: Principal) -> list[ApiKeyRecord]:
        return await self._store.api_keys(owner.tenant_id, owner.id)

    async def revoke(self, tenant_id: str, key_id: str) -> ApiKeyRecord | None:
        self._verified.clear()
        return await self._store.revoke_api_key(tenant_id, key_id, self._clock())

    def forget(self) -> None:
        self._verified.clear()

    async def verify(self, api_key: str) -> ActorContext:
        digest = hashlib.sha256(api_key.encode()).digest()
        now = self._clock()
        cached = self._verified.get(digest)
        if cached is not None and now - cached[0] < self._ttl and now < cached[1].expires_at:
            self._touch(cached[1], now)
            return cached[1]
        actor = await self._verify(api_key, now)
        if len(self._verified) > 100_000:
            self._verified.clear()
        self._verified[digest] = (now, actor)
        self._touch(actor, now)
        return actor

    async def _verify(self, api_key: str, now: float) -> ActorContext:
        parsed = parse_key(api_key)
        if parsed is None or parsed.env != self._env:
            raise ApiKeyInvalid()
        record = await self._store.api_key(parsed.id)
        if record is None or record.revoked_at is not None or record.expires_at <= now:
            raise ApiKeyInvalid()
        if not await self._keys.verify_mac(
            SYSTEM_TENANT, MAC_KEY, parsed.secret.encode(), record.mac, record.mac_version
        ):
            raise ApiKeyInvalid()
        principal = await self._store.principal(record.tenant_id, record.principal_id)
        if principal is None or principal.disabled or _expired(principal, now):
            raise ApiKeyInvalid()
        return _actor(record, principal)

    def _touch(self, actor: ActorContext, now: float) -> None:
        key_id = actor.token_id or ""
        if now - self._touched.get(key_id, 0.0) >= _TOUCH_EVERY:
            if len(self._touched) >= _TOUCHED_LIMIT:
                # Full within one flush interval: start over (at worst one write too many per
                # key) rather than scan it on this call; `flush` prunes by age.
                self._touched.clear()
            self._touched[key_id] = now
            self._pending[0][key_id] = now
            self._pending[1][actor.subject] = now

    def _forget_touches(self, now: float) -> None:
        """Drop what no longer coalesces anything (a write older than a minute)."""
        self._touched = {k: t for k, t in self._touched.items() if now - t < _TOUCH_EVERY}

    async def flush(self) -> None:
        """Write the coalesced last-use times (a background job calls this every sweep
        interval, and the server at shutdown). A failed write keeps them for the next flush."""
        self._forget_touches(self._clock())
        keys, principals = self._pending
        if not (keys or principals):
            return
        self._pending = ({}, {})
        try:
            await self._store.touch(keys, principals)
        except BaseException:
            for pending, failed in zip(self._pending, (keys, principals), strict=True):
                for name, when in failed.items():
                    pending[name] = max(when, pending.get(name, when))
            raise


def _actor(record: ApiKeyRecord, principal: Principal) -> ActorContext:
    expires = record.expires_at
    if principal.expires_at is not None:
        expires = min(expires, principal.expires_at)
    scopes = record.scopes if record.scopes is not None else principal.scopes
    return ActorContext(
        tenant_id=record.tenant_id,
        subject=principal.id,
        subject_type=principal.type,
        auth_method=AuthMethod.API_KEY,
        roles=frozenset(principal.roles),
        scopes=None if scopes is None else frozenset(scopes),
        token_id=record.id,
        issued_at=record.created_at,
        expires_at=expires,
    )


def _expired(principal: Principal, now: float) -> bool:
    return principal.expires_at is not None and principal.expires_at <= now


def _check_expiry(expires_at: float, now: float, cap: float) -> None:
    if not now < expires_at <= now + cap:
        days = round(cap / 86_400)
        raise InvalidArgument.fields(
            FieldViolation(
                "expire_time", f"required, in the future, at most {days} days ahead (tenant cap)"
            )
        )


def covers(grant: str, scope: str) -> bool:
    """Does a role grant (a pattern) cover a requested scope (itself possibly a pattern)?"""
    return matches(grant, scope)


def _check_scopes(owner: Principal, scopes: Sequence[str]) -> tuple[str, ...] | None:
    if not scopes:
        return None
    grants = [g for role in owner.roles for g in ROLE_GRANTS.get(role, ())]
    limits = owner.scopes
    bad = [
        s
        for s in scopes
        if not any(covers(g, s) for g in grants)
        or (limits is not None and not any(covers(g, s) for g in limits))
    ]
    if bad:
        raise InvalidArgument.fields(
            *(
                FieldViolation("scopes", f"{s!r} is not within the principal's permissions")
                for s in bad
            )
        )
    return tuple(scopes)


def _random(length: int) -> str:
    return "".join(secrets.choice(_BASE62) for _ in range(length))
