"""Authenticator: login, token issuance, refresh rotation with reuse detection, sessions.

Passwords are argon2id (argon2-cffi), verified in a worker thread so a login never stalls the
event loop. Unknown tenants, unknown emails, disabled users and wrong passwords all fail the
same way (LOGIN_FAILED) after the same argon2 work, so logins cannot enumerate accounts.

Brute force: before any password is checked, the attempt takes a slot from two atomic
counters in the cache — per account and per client address — so parallel guesses cannot get
past the limit. A full counter locks its account or address and answers RESOURCE_EXHAUSTED /
LOGIN_THROTTLED with RetryInfo; each lock lasts twice as long as the one before (one login
window, then two, four, … capped at one hour; timed by the injected clock): exponential
back-off, never a permanent lock an attacker could use against the account owner. A successful
login clears the account's current counter.

Access tokens are EdDSA JWTs signed through the Crypto service's keyring (tenant `_system`,
key `auth-access-tokens`), verified by the authenticate layer with the JWKS of that key.
Refresh tokens are opaque, single use and stored as SHA-256 digests; presenting a spent one
revokes its whole session at once (deny-list), because a spent token coming back means it was
stolen from one of the two parties that held it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from trustplane.common.v1 import error_reason_pb2 as reasons

from server import wire
from server.actor import ActorContext, PrincipalType
from server.auth.mfa import Mfa, MfaCodeInvalid, MfaRequired
from server.auth.model import (
    SYSTEM_TENANT,
    TOKEN_KEY,
    ApiKeyRecord,
    AuthSession,
    IssuedTokens,
    Principal,
    Tenant,
)
from server.auth.store import PgAuthStore, RefreshOutcome
from server.cache import Cache
from server.config import AuthConfig
from server.crypto.model import Algorithm, Key
from server.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SecretAlreadyShown,
    Unauthenticated,
)
from server.page_token import PageTokens, page_size
from server.permissions import ROLE_GRANTS, matches
from server.tokens import TokenExpired

_REFRESH_PREFIX = "tprt_"
_MAX_WINDOW = 3600.0


class LoginFailed(Unauthenticated):
    reason = reasons.ERROR_REASON_LOGIN_FAILED
    default_message = "login failed: unknown tenant or email, or wrong password"


class LoginThrottled(ResourceExhausted):
    reason = reasons.ERROR_REASON_LOGIN_THROTTLED
    default_message = "too many login attempts; retry later"


class RefreshTokenInvalid(Unauthenticated):
    reason = reasons.ERROR_REASON_REFRESH_TOKEN_INVALID
    default_message = "refresh token is invalid or expired"


class RefreshTokenReused(Unauthenticated):
    reason = reasons.ERROR_REASON_REFRESH_TOKEN_REUSED
    default_message = "refresh token was already used; its session has been revoked"


class InvitationInvalid(Unauthenticated):
    reason = reasons.ERROR_REASON_INVITATION_INVALID
    default_message = "invitation is invalid"


_ROLE_RANK = {"viewer": 1, "member": 2, "admin": 3, "owner": 4}
_MANAGED = (PrincipalType.AGENT, PrincipalType.SERVICE_ACCOUNT)
_INVITE_PREFIX = "tpinv_"


class Signer(Protocol):
    """The Crypto keyring's signing API (KeyManager)."""

    async def ensure_signing_key(self, tenant_id: str, name: str, algorithm: Algorithm) -> Key: ...
    async def ensure_rotation(self, tenant_id: str, name: str, period: float | None) -> Key: ...
    async def sign_jwt(self, tenant_id: str, name: str, claims: dict[str, Any]) -> str: ...
    async def jwks(self, tenant_id: str, name: str) -> dict[str, Any]: ...


class SessionRevoker(Protocol):
    """The deny-list (RevocationList)."""

    async def revoke_session(self, session_id: str) -> None: ...
    async def revoke_subject(self, tenant_id: str, subject: str) -> None: ...
    async def revoke_token(self, token_id: str) -> None: ...


class AgentSessions(Protocol):
    """The Session service's check for delegation into an agent session (SessionManager)."""

    async def check_delegable(self, tenant_id: str, session_id: str, agent_id: str) -> None:
        """Raise unless the session exists in the tenant, runs `agent_id` and has not ended."""
        ...


class ApiKeyRevoker(Protocol):
    async def revoke(self, tenant_id: str, key_id: str) -> Any: ...


class PermissionChecker(Protocol):
    """Decides a permission beyond the method's own (the authorizer: PolicyAuthorizer), e.g.
    `auth.sessions.manage` to act on another principal's sessions."""

    async def decide(self, actor: ActorContext, permission: str) -> Any: ...


SESSIONS_MANAGE = "auth.sessions.manage"


def _is_admin(actor: ActorContext) -> bool:
    return bool({"admin", "owner"} & actor.roles)


class Authenticator:
    """See the module docstring."""

    def __init__(
        self,
        store: PgAuthStore,
        signer: Signer,
        revocations: SessionRevoker,
        cache: Cache,
        config: AuthConfig,
        page_tokens: PageTokens,
        *,
        clock: Callable[[], float] = time.time,
        hasher: PasswordHasher | None = None,
        mfa: Mfa | None = None,
        agent_sessions: AgentSessions | None = None,
        permissions: PermissionChecker | None = None,
    ) -> None:
        self._agent_sessions = agent_sessions
        self._permissions = permissions
        self._page_tokens = page_tokens
        self._mfa = mfa
        self._store = store
        self._signer = signer
        self._revocations = revocations
        self._cache = cache
        self._config = config
        self._clock = clock
        self._hasher = hasher or PasswordHasher()
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    async def start(self) -> None:
        await self._signer.ensure_signing_key(SYSTEM_TENANT, TOKEN_KEY, Algorithm.ED25519)
        # Rotated by the crypto sweeper like any key; GetJwks keeps the older versions.
        period = self._config.token_key_rotation
        await self._signer.ensure_rotation(SYSTEM_TENANT, TOKEN_KEY, period)

    async def jwks(self) -> dict[str, Any]:
        return await self._signer.jwks(SYSTEM_TENANT, TOKEN_KEY)

    # --- login ------------------------------------------------------------------------------

    async def login(
        self,
        tenant_name: str,
        email: str,
        password: str,
        client: str,
        totp_code: str = "",
        recovery_code: str = "",
    ) -> tuple[IssuedTokens, Principal]:
        _require(tenant=tenant_name, email=email, password=password)
        account = f"login:acct:{_digest(tenant_name + chr(0) + email.lower())}"
        counter = await self._take_attempt(account, self._config.login_max_failures)
        await self._take_attempt(f"login:client:{client}", self._config.login_max_failures * 4)
        principal = await self._check_password(tenant_name, email, password)
        if principal.mfa_enabled:
            await self._second_factor(principal, totp_code, recovery_code)
        await self._cache.delete(counter)
        return await self._new_session(principal), principal

    async def _second_factor(self, principal: Principal, totp_code: str, recovery: str) -> None:
        if self._mfa is None:
            raise MfaRequired()
        if not (totp_code or recovery):
            raise MfaRequired()
        if not await self._mfa.check(principal, totp_code, recovery):
            raise MfaCodeInvalid()

    async def _check_password(self, tenant_name: str, email: str, password: str) -> Principal:
        tenant = await self._store.tenant_by_name(tenant_name)
        principal = await self._store.user_by_email(tenant.id, email) if tenant else None
        stored = principal.password_hash if principal else None
        valid = await asyncio.to_thread(self._verify, stored or self._dummy_hash, password)
        if principal is None or stored is None or not valid or principal.disabled:
            raise LoginFailed()
        return principal

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return bool(self._hasher.verify(stored, password))
        except (VerificationError, InvalidHashError):
            return False

    async def _take_attempt(self, key: str, limit: int) -> str:
        """Take one slot of `key`'s attempt counter (returned) or raise LoginThrottled.

        `key:until` holds the end of the current lock (by this service's clock); `key:s` the
        strikes so far. Each strike has its own counter (`key:n:<strikes>`, counting attempts
        within the login window), so when a lock ends counting starts afresh. The first caller
        to find a strike's counter full sets the lock — window * 2^strikes, at most an hour —
        *then* moves to the next strike; attempts read the strikes *before* the lock, so a
        concurrent attempt sees either the full counter or the lock, never a fresh counter
        without the lock.
        """
        now = self._clock()
        strikes = int(await self._cache.get(key + ":s") or 0)  # read before the lock: see above
        until = await self._cache.get(key + ":until")
        if until is not None and float(until) > now:
            raise LoginThrottled(retry_after=float(until) - now)
        counter = f"{key}:n:{strikes}"
        allowed, _ = await self._cache.incr_if_below(counter, 1, limit, self._config.login_window)
        if allowed:
            return counter
        lock = min(self._config.login_window * 2**strikes, _MAX_WINDOW)
        if await self._cache.set_if_absent(f"{key}:full:{strikes}", b"1", lock):
            await self._cache.set(key + ":until", repr(now + lock).encode(), ttl=lock)
            if lock < _MAX_WINDOW:
                await self._cache.incr(key + ":s", 1, ttl=86_400)
            raise LoginThrottled(retry_after=lock)
        until = await self._cache.get(key + ":until")
        left = float(until) - self._clock() if until else lock  # the winner's clock read is later
        raise LoginThrottled(retry_after=min(max(left, 0.0), lock))

    # --- tokens -----------------------------------------------------------------------------

    async def _new_session(self, principal: Principal) -> IssuedTokens:
        now = self._clock()
        refresh, refresh_hash = _refresh_token()
        refresh_expires = now + self._config.refresh_token_ttl
        session_id = await self._store.create_session(
            principal.tenant_id, principal.id, now, refresh_expires, refresh_hash, refresh_expires
        )
        return await self._issue(principal, session_id, now, refresh, refresh_expires)

    async def _issue(
        self,
        principal: Principal,
        session_id: str,
        now: float,
        refresh: str,
        refresh_expires: float,
    ) -> IssuedTokens:
        expires = now + self._config.access_token_ttl
        claims = {
            "iss": self._config.issuer,
            "aud": self._config.audience,
            "sub": principal.id,
            "tid": principal.tenant_id,
            "ptype": principal.type.value,
            "roles": list(principal.roles),
            "sid": session_id,
            "jti": uuid.uuid4().hex,
            "iat": int(now),
            "exp": int(expires),
        }
        if principal.scopes is not None:
            claims["scope"] = " ".join(principal.scopes)
        token = await self._signer.sign_jwt(SYSTEM_TENANT, TOKEN_KEY, claims)
        return IssuedTokens(token, int(expires), refresh, refresh_expires, session_id)

    async def refresh(self, token: str) -> IssuedTokens:
        if not token.startswith(_REFRESH_PREFIX):
            raise RefreshTokenInvalid()
        now = self._clock()
        fresh, fresh_hash = _refresh_token()
        outcome, session = await self._store.spend_refresh(
            _digest_bytes(token), now, fresh_hash, now + self._config.refresh_token_ttl
        )
        if outcome == RefreshOutcome.REUSED and session is not None:
            await self._store.revoke_session_by_id(session.id, now)
            await self._revocations.revoke_session(session.id)
            raise RefreshTokenReused()
        if outcome != RefreshOutcome.SPENT or session is None:
            raise RefreshTokenInvalid()
        principal = await self._store.principal(session.tenant_id, session.principal_id)
        if principal is None or principal.disabled:
            raise RefreshTokenInvalid()
        return await self._issue(
            principal, session.id, now, fresh, now + self._config.refresh_token_ttl
        )

    # --- delegation, introspection, revocation ---------------------------------------------

    async def exchange(
        self,
        subject: ActorContext,
        actor: ActorContext,
        scopes: list[str],
        audience: str,
        agent_session: str,
    ) -> tuple[str, float, list[str]]:
        """RFC 8693: a token for `subject` acted on by `actor`; see the proto comment."""
        _check_delegation(subject, actor, self._config.delegation_max_depth)
        if agent_session:
            await self._check_agent_session(actor, agent_session)
        granted = [s for s in scopes if _allows(subject, s) and _allows(actor, s)]
        if not granted:
            raise InvalidArgument.fields(
                FieldViolation(
                    "scopes", "name at least one scope that both the user and the agent hold"
                )
            )
        now = self._clock()
        # Never outlive either credential it was exchanged from (an API key about to expire,
        # a user token near its end).
        expires = min(now + self._config.delegation_ttl, subject.expires_at, actor.expires_at)
        if expires - now < 1.0:  # a token dead on arrival (JWT times are whole seconds)
            raise TokenExpired("a credential this token would derive from expires now")
        claims: dict[str, Any] = {
            "iss": self._config.issuer,
            "aud": audience or self._config.audience,
            "sub": subject.subject,
            "tid": subject.tenant_id,
            "ptype": subject.subject_type.value,
            "roles": sorted(subject.roles),
            "scope": " ".join(granted),
            "act": _act_claim(actor, subject),
            "jti": uuid.uuid4().hex,
            "iat": int(now),
            "exp": int(expires),
        }
        if subject.session_id:
            claims["sid"] = subject.session_id  # revoking the user's session kills this token
        sources = _sources(subject, actor)
        if sources:
            # Revoking any credential this came from (the user's API key or token, the agent's
            # key, a delegated token it extends) kills this token too, with or without a `sid`.
            claims["derived_from"] = sources
        if agent_session:
            claims["asid"] = agent_session
        token = await self._signer.sign_jwt(SYSTEM_TENANT, TOKEN_KEY, claims)
        return token, float(int(expires)), granted

    async def _check_agent_session(self, actor: ActorContext, agent_session: str) -> None:
        """The `asid` must name a live session of the acting agent; without the Session
        service to ask, no token is bound to a session (fail closed)."""
        if self._agent_sessions is None:
            raise InvalidArgument(
                "agent sessions are not available",
                reason=reasons.ERROR_REASON_AGENT_SESSION_INVALID,
                field_violations=[FieldViolation("agent_session_id", "unknown agent session")],
            )
        await self._agent_sessions.check_delegable(actor.tenant_id, agent_session, actor.subject)

    async def revoke_token(self, caller: ActorContext, token: ActorContext) -> None:
        """RFC 7009: the caller's own token, or (admins) any token of the tenant."""
        if token.tenant_id != caller.tenant_id or not token.token_id:
            return
        if token.subject == caller.subject or _is_admin(caller):
            await self._revocations.revoke_token(token.token_id)

    # --- sessions ---------------------------------------------------------------------------

    async def sessions(
        self, actor: ActorContext, principal_id: str, size: int, token: str
    ) -> tuple[list[AuthSession], str]:
        """Active sessions of the caller, or (admins) of a principal of the tenant; a page."""
        limit = page_size(size)
        whose = await self._session_owner(actor, principal_id)
        query = f"auth.ListSessions\0{actor.tenant_id}\0{whose}"
        after = self._page_tokens.decode(query, token)["after"] if token else ""
        found = await self._store.sessions(actor.tenant_id, whose, self._clock(), limit + 1, after)
        if len(found) <= limit:
            return found, ""
        return found[:limit], self._page_tokens.encode(query, {"after": found[limit - 1].id})

    async def revoke_session(self, actor: ActorContext, session_id: str) -> None:
        """One of the caller's sessions, or (admins) any session of the tenant."""
        _require(session_id=session_id)
        if not _is_uuid(session_id):
            raise NotFound("session not found")
        now = self._clock()
        revoked = bool(
            await self._store.revoke_sessions(actor.tenant_id, actor.subject, now, session_id)
        )
        if not revoked and await self._manages_sessions(actor):
            revoked = bool(
                await self._store.revoke_sessions(actor.tenant_id, None, now, session_id)
            )
        if not revoked:  # another principal's session looks exactly like a missing one
            raise NotFound("session not found")
        await self._revocations.revoke_session(session_id)

    async def revoke_all(self, actor: ActorContext, principal_id: str = "") -> int:
        """Every session of the caller, or (admins) of a principal of the tenant."""
        whose = await self._session_owner(actor, principal_id)
        revoked = await self._store.revoke_sessions(actor.tenant_id, whose, self._clock())
        for session_id in revoked:
            await self._revocations.revoke_session(session_id)
        return len(revoked)

    async def _session_owner(self, actor: ActorContext, principal_id: str) -> str:
        """The principal whose sessions a call is about: the caller's own unless it names
        another principal of the tenant and holds `auth.sessions.manage`."""
        if not principal_id or principal_id == actor.subject:
            return actor.subject
        if not await self._manages_sessions(actor):
            raise PermissionDenied(
                f"another principal's sessions need {SESSIONS_MANAGE}",
                metadata={"permission": SESSIONS_MANAGE},
            )
        if await self._store.principal(actor.tenant_id, principal_id) is None:
            raise NotFound("principal not found")
        return principal_id

    async def _manages_sessions(self, actor: ActorContext) -> bool:
        if self._permissions is None:  # nothing to ask: only one's own sessions (fail closed)
            return False
        return bool((await self._permissions.decide(actor, SESSIONS_MANAGE)).allowed)

    # --- agents -----------------------------------------------------------------------------

    async def create_agent(
        self,
        kind: PrincipalType,
        actor: ActorContext,
        display_name: str,
        purpose: str,
        roles: list[str],
        scopes: list[str] | None,
        expires_at: float | None,
        request_id: str,
    ) -> Principal:
        if not 1 <= len(display_name) <= 128:
            raise InvalidArgument.fields(FieldViolation("display_name", "1-128 characters"))
        if expires_at is not None and expires_at <= self._clock():
            raise InvalidArgument.fields(FieldViolation("expire_time", "must be in the future"))
        lacking = [r for r in roles if r not in actor.roles and not _is_admin(actor)]
        if lacking:
            raise PermissionDenied(
                f"an agent cannot get roles its owner lacks: {lacking}",
                metadata={"roles": ",".join(lacking)},
            )
        owner = await self._own_principal(actor)
        if kind not in _MANAGED:
            raise InvalidArgument.fields(
                FieldViolation("principal_type", "AGENT or SERVICE_ACCOUNT")
            )
        return await self._store.create_agent(
            kind,
            actor.tenant_id,
            owner.id,
            display_name,
            purpose,
            roles,
            scopes,
            expires_at,
            request_id,
        )

    async def agent(self, actor: ActorContext, agent_id: str) -> Principal:
        found = await self._store.principal(actor.tenant_id, agent_id)
        if found is None or found.type not in _MANAGED:
            raise NotFound("agent not found")
        return found

    async def list_agents(
        self, actor: ActorContext, size: int, token: str, kind: PrincipalType | None = None
    ) -> tuple[list[Principal], str]:
        limit = page_size(size)
        kinds = (kind,) if kind in _MANAGED else _MANAGED
        query = f"auth.ListAgents\0{actor.tenant_id}\0{','.join(k.value for k in kinds)}"
        after = self._page_tokens.decode(query, token)["after"] if token else ""
        agents = await self._store.list_agents(actor.tenant_id, kinds, after, limit + 1)
        if len(agents) <= limit:
            return agents, ""
        return agents[:limit], self._page_tokens.encode(query, {"after": agents[limit - 1].id})

    async def set_agent_disabled(
        self, actor: ActorContext, agent_id: str, disabled: bool, api_keys: ApiKeyRevoker
    ) -> Principal:
        """The kill switch: every token and API key of the agent stops working at once."""
        agent = await self.managed_principal(actor, agent_id)
        await self._store.set_disabled(actor.tenant_id, agent.id, disabled)
        if disabled:
            for key in await self._store.api_keys(actor.tenant_id, agent.id):
                await api_keys.revoke(actor.tenant_id, key.id)
                await self._revocations.revoke_token(key.id)
            await self._store.revoke_sessions(actor.tenant_id, agent.id, self._clock())
            await self._revocations.revoke_subject(actor.tenant_id, agent.id)
        return await self.agent(actor, agent.id)

    async def api_key_of(self, actor: ActorContext, key_id: str) -> tuple[Principal, ApiKeyRecord]:
        """A live key the caller may manage, with its owner (NOT_FOUND otherwise)."""
        record = await self._store.api_key(key_id) if key_id else None
        now = self._clock()
        if (
            record is None
            or record.tenant_id != actor.tenant_id
            or record.revoked_at is not None
            or record.expires_at <= now
        ):
            raise NotFound("API key not found")
        return await self.managed_principal(actor, record.principal_id), record

    async def revoke_api_key(
        self, actor: ActorContext, key_id: str, api_keys: ApiKeyRevoker
    ) -> None:
        """Revoke a key of the caller or of an agent it owns (admins: any key of the tenant)."""
        record = await self._store.api_key(key_id) if key_id else None
        if record is None or record.tenant_id != actor.tenant_id:
            raise NotFound("API key not found")
        await self.managed_principal(actor, record.principal_id)
        await api_keys.revoke(actor.tenant_id, key_id)
        await self._revocations.revoke_token(key_id)

    async def update_agent(
        self, actor: ActorContext, agent_id: str, changes: dict[str, Any], etag: str
    ) -> Principal:
        agent = await self.managed_principal(actor, agent_id)
        if agent.type not in _MANAGED:
            raise NotFound("agent not found")
        lacking = [r for r in changes.get("roles", ()) if r not in actor.roles]
        if lacking and not _is_admin(actor):
            raise PermissionDenied(f"an agent cannot get roles its owner lacks: {lacking}")
        expires = changes.get("expires_at")
        if expires is not None and expires <= self._clock():
            raise InvalidArgument.fields(FieldViolation("agent.expire_time", "in the future"))
        return await self._store.update_principal(
            actor.tenant_id, agent.id, agent.type, changes, wire.revision(etag)
        )

    async def user(self, actor: ActorContext, user_id: str) -> Principal:
        found = await self._store.principal(actor.tenant_id, user_id)
        if found is None or found.type is not PrincipalType.USER:
            raise NotFound("user not found")
        return found

    async def list_users(
        self, actor: ActorContext, size: int, token: str
    ) -> tuple[list[Principal], str]:
        limit = page_size(size)
        query = f"auth.ListUsers\0{actor.tenant_id}"
        after = self._page_tokens.decode(query, token)["after"] if token else ""
        users = await self._store.list_principals(
            actor.tenant_id, PrincipalType.USER, after, limit + 1
        )
        if len(users) <= limit:
            return users, ""
        return users[:limit], self._page_tokens.encode(query, {"after": users[limit - 1].id})

    async def update_user(
        self, actor: ActorContext, user_id: str, changes: dict[str, Any], etag: str
    ) -> Principal:
        own_rank = max((_ROLE_RANK.get(r, 0) for r in actor.roles), default=0)
        roles = changes.get("roles", [])
        unknown = [r for r in roles if r not in _ROLE_RANK]
        if unknown:
            raise InvalidArgument.fields(FieldViolation("user.roles", f"unknown roles {unknown}"))
        if any(_ROLE_RANK[r] > own_rank for r in roles):
            raise PermissionDenied("cannot grant a role above your own")
        target = await self.user(actor, user_id)
        updated = await self._store.update_principal(
            actor.tenant_id, target.id, PrincipalType.USER, changes, wire.revision(etag)
        )
        if changes.get("disabled"):
            await self._store.revoke_sessions(actor.tenant_id, target.id, self._clock())
            await self._revocations.revoke_subject(actor.tenant_id, target.id)
        return updated

    async def managed_principal(self, actor: ActorContext, principal_id: str) -> Principal:
        """The caller itself (empty id), or an agent the caller owns (admins: any agent)."""
        if not principal_id or principal_id == actor.subject:
            return await self._own_principal(actor)
        agent = await self.agent(actor, principal_id)
        if agent.owner_id != actor.subject and not _is_admin(actor):
            raise PermissionDenied("only the agent's owner or an admin may do this")
        return agent

    async def own_user(self, actor: ActorContext) -> Principal:
        """The caller as a user of this server (MFA and passwords are for users)."""
        principal = await self._own_principal(actor)
        if principal.type is not PrincipalType.USER:
            raise FailedPrecondition("only users have passwords and MFA")
        return principal

    async def _own_principal(self, actor: ActorContext) -> Principal:
        found = await self._store.principal(actor.tenant_id, actor.subject)
        if found is None:
            # e.g. a user of an external issuer: not a principal of this server's store
            raise NotFound("the caller is not a principal registered with this server")
        return found

    # --- invitations ------------------------------------------------------------------------

    async def invite(
        self, actor: ActorContext, email: str, role: str, request_id: str
    ) -> tuple[str, str, float]:
        """(invitation id, token shown once, expiry)."""
        if "@" not in email or len(email) > 254:
            raise InvalidArgument.fields(FieldViolation("email", "must be an email address"))
        if role not in _ROLE_RANK:
            raise InvalidArgument.fields(FieldViolation("role", "viewer, member, admin or owner"))
        if _ROLE_RANK[role] > max((_ROLE_RANK.get(r, 0) for r in actor.roles), default=0):
            raise PermissionDenied(
                "cannot invite with a role above your own", metadata={"role": role}
            )
        inviter = await self._own_principal(actor)
        token = _INVITE_PREFIX + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
        now = self._clock()
        expires = now + self._config.invitation_ttl
        created = await self._store.create_invitation(
            actor.tenant_id,
            email,
            role,
            _digest_bytes(token),
            inviter.id,
            now,
            expires,
            request_id,
        )
        if created is None:  # this request id invited before: never show a token twice
            raise SecretAlreadyShown(metadata={"request_id": request_id})
        return created, token, expires

    async def revoke_invitation(self, actor: ActorContext, invitation_id: str) -> None:
        if not await self._store.revoke_invitation(actor.tenant_id, invitation_id, self._clock()):
            raise NotFound("invitation not found")

    async def accept_invitation(
        self, token: str, password: str, display_name: str
    ) -> tuple[Principal, str]:
        if len(password) < 12:
            raise InvalidArgument.fields(FieldViolation("password", "at least 12 characters"))
        hashed = await asyncio.to_thread(self._hasher.hash, password)
        why, user = await self._store.accept_invitation(
            _digest_bytes(token), self._clock(), hashed, display_name[:128]
        )
        if user is None:
            raise InvitationInvalid(f"invitation is {why}")
        return user, await self._store.tenant_name(user.tenant_id)

    # --- tenant -----------------------------------------------------------------------------

    async def tenant(self, actor: ActorContext) -> tuple[Tenant, str, int]:
        found = await self._store.tenant(actor.tenant_id)
        if found is None:
            raise NotFound("the caller's tenant is not registered with this server")
        tenant, display_name, settings = found
        return tenant, display_name, _ttl_days(settings)

    async def update_tenant(
        self, actor: ActorContext, display_name: str | None, api_key_days: int | None
    ) -> tuple[Tenant, str, int]:
        if "owner" not in actor.roles:
            raise PermissionDenied("only the tenant's owners may change it")
        if api_key_days is not None and not 0 <= api_key_days <= 90:
            raise InvalidArgument.fields(
                FieldViolation("tenant.api_key_max_ttl_days", "0 to 90 (0 means 90)")
            )
        settings: dict[str, object] = (
            {} if api_key_days is None else {"api_key_max_ttl_days": api_key_days or 90}
        )
        await self.tenant(actor)
        await self._store.update_tenant(actor.tenant_id, display_name, settings)
        return await self.tenant(actor)

    # --- administration ---------------------------------------------------------------------

    async def bootstrap(self, tenant_name: str, email: str) -> tuple[str, Principal, str]:
        """Create a tenant and its owner with a generated password (returned, shown once)."""
        return await bootstrap(self._store, self._hasher, tenant_name, email)

    async def has_tenants(self) -> bool:
        return await self._store.count_tenants() > 0


async def bootstrap(
    store: PgAuthStore, hasher: PasswordHasher, tenant_name: str, email: str
) -> tuple[str, Principal, str]:
    """The first tenant and its owner; the generated password is returned once, never stored."""
    _require(tenant=tenant_name, email=email)
    tenant = await store.create_tenant(str(uuid.uuid4()), tenant_name)
    password = secrets.token_urlsafe(18)
    hashed = await asyncio.to_thread(hasher.hash, password)
    owner = await store.create_user(tenant.id, email, hashed, ["owner"], "Owner")
    return tenant.id, owner, password


def _ttl_days(settings: dict[str, object]) -> int:
    value = settings.get("api_key_max_ttl_days", 90)
    return value if isinstance(value, int) and 1 <= value <= 90 else 90


def _check_delegation(subject: ActorContext, actor: ActorContext, max_depth: int) -> None:
    problems = []
    if subject.subject_type is not PrincipalType.USER:
        problems.append(FieldViolation("subject_token", "must be a user's token"))
    if actor.subject_type is not PrincipalType.AGENT or actor.act:
        problems.append(FieldViolation("actor_token", "must be an agent's own credential"))
    if actor.tenant_id != subject.tenant_id:
        problems.append(FieldViolation("actor_token", "belongs to another tenant"))
    if actor.subject in subject.chain:
        problems.append(FieldViolation("actor_token", "already in the delegation chain"))
    if problems:
        raise InvalidArgument.fields(*problems)
    if len(subject.act) + 1 > max_depth:
        raise FailedPrecondition(
            f"delegation chains are limited to {max_depth} actors",
            reason=reasons.ERROR_REASON_DELEGATION_TOO_DEEP,
        )


def _sources(subject: ActorContext, actor: ActorContext) -> list[str]:
    """The credential ids a delegated token derives from, inherited ones included."""
    found = [*subject.derived_from, subject.token_id, *actor.derived_from, actor.token_id]
    return list(dict.fromkeys(s for s in found if s))


def _allows(holder: ActorContext, scope: str) -> bool:
    grants = [g for role in holder.roles for g in ROLE_GRANTS.get(role, ())]
    if not any(matches(g, scope) for g in grants):
        return False
    return holder.scopes is None or any(matches(s, scope) for s in holder.scopes)


def _act_claim(actor: ActorContext, subject: ActorContext) -> dict[str, Any]:
    """The new current actor outermost, the subject token's actors nested (RFC 8693 §4.1)."""
    claim: dict[str, Any] = {"sub": actor.subject, "ptype": actor.subject_type.value}
    nested = claim
    for prior in subject.act:
        nested["act"] = {"sub": prior.subject, "ptype": prior.subject_type.value}
        nested = nested["act"]
    return claim


def _refresh_token() -> tuple[str, bytes]:
    token = _REFRESH_PREFIX + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
    return token, _digest_bytes(token)


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:32]


def _digest_bytes(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _require(**fields: str) -> None:
    missing = [FieldViolation(name, "required") for name, value in fields.items() if not value]
    if missing:
        raise InvalidArgument.fields(*missing)
