"""JWT verification: trusted issuers, their key sources, claim mapping, a verified-token cache.

Rules (docs/authentication.md): algorithms EdDSA, ES256 and RS256 only — never `none`, never
HS* (so a public key can never be used as an HMAC secret); the header's `alg` must match the
key's type; exact `iss` (it selects the trusted issuer) and `aud`; `exp`, `iat`, `sub`, `iss`
and `aud` required; `exp`/`nbf`/`iat` checked with a leeway of at most 60 s. An unknown `kid`
triggers one single-flight refresh of that issuer's key source (at most one per second), then
fails. A verified token is cached — bounded LRU keyed by the SHA-256 of the token, never past
its `exp` — so the hot path is one hash and one dictionary lookup.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
from jwt import PyJWK, PyJWKSet
from trustplane.common.v1 import error_reason_pb2 as reasons

from server.actor import ActorContext, AuthMethod, DelegateActor, PrincipalType
from server.errors import Unauthenticated

_log = logging.getLogger("trustplane.tokens")
ALLOWED_ALGORITHMS = frozenset({"EdDSA", "ES256", "RS256"})
_REQUIRED_CLAIMS = ["exp", "iat", "sub", "iss", "aud"]
_MAX_ACT_DEPTH = 8
_REFRESH_INTERVAL = 1.0


class CredentialsMissing(Unauthenticated):
    reason = reasons.ERROR_REASON_CREDENTIALS_MISSING
    default_message = "authentication required: send `authorization: Bearer <token>`"


class CredentialsMalformed(Unauthenticated):
    reason = reasons.ERROR_REASON_CREDENTIALS_MALFORMED
    default_message = "credentials are malformed"


class TokenExpired(Unauthenticated):
    reason = reasons.ERROR_REASON_TOKEN_EXPIRED
    default_message = "token has expired"


class TokenNotYetValid(Unauthenticated):
    reason = reasons.ERROR_REASON_TOKEN_NOT_YET_VALID
    default_message = "token is not yet valid"


class TokenSignatureInvalid(Unauthenticated):
    reason = reasons.ERROR_REASON_TOKEN_SIGNATURE_INVALID
    default_message = "token signature is invalid"


class TokenAudienceInvalid(Unauthenticated):
    reason = reasons.ERROR_REASON_TOKEN_AUDIENCE_INVALID
    default_message = "token audience is not this server"


class TokenIssuerInvalid(Unauthenticated):
    reason = reasons.ERROR_REASON_TOKEN_ISSUER_INVALID
    default_message = "token issuer is not trusted"


class TokenRevoked(Unauthenticated):
    reason = reasons.ERROR_REASON_TOKEN_REVOKED
    default_message = "token has been revoked"


class ApiKeyInvalid(Unauthenticated):
    reason = reasons.ERROR_REASON_API_KEY_INVALID
    default_message = "API key is invalid"


# --- key sources ---------------------------------------------------------------------------


class KeySource(Protocol):
    """Where an issuer's public keys come from."""

    async def get(self, kid: str | None) -> PyJWK | None:
        """The key with this `kid` (None: the only key, if there is exactly one)."""
        ...

    async def refresh(self) -> None:
        """Reload the keys (called on an unknown `kid`)."""
        ...


class KeySet:
    """An in-memory JWKS; `select` implements the kid rules shared by every source."""

    def __init__(self, keys: Iterable[PyJWK] = ()) -> None:
        self._keys = {key.key_id: key for key in keys}

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any]) -> KeySet:
        return cls(PyJWKSet.from_dict(dict(jwks)).keys)

    def select(self, kid: str | None) -> PyJWK | None:
        if kid is not None:
            return self._keys.get(kid)
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    def kids(self) -> frozenset[str | None]:
        return frozenset(self._keys)


class JwksFileSource:
    """Keys from a JWKS file (how a Keycloak-style IdP's keys are configured); re-read on
    refresh, so rotating the file needs no restart."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._keys = KeySet()

    async def get(self, kid: str | None) -> PyJWK | None:
        return self._keys.select(kid)

    async def refresh(self) -> None:
        text = await asyncio.to_thread(self._path.read_text)
        self._keys = KeySet.from_jwks(json.loads(text))


class LocalKeySource:
    """The server's own signing keys, published to it by the key owner (the Auth service's
    keyring); `loader` is asked again on refresh. When a publication drops a key (its version
    was destroyed), `on_removed` runs, so tokens it verified can be forgotten."""

    def __init__(
        self,
        loader: Callable[[], Any] | None = None,
        on_removed: Callable[[], None] | None = None,
    ) -> None:
        self._loader = loader
        self._on_removed = on_removed
        self._keys = KeySet()

    def publish(self, jwks: Mapping[str, Any]) -> None:
        before, self._keys = self._keys, KeySet.from_jwks(jwks)
        if self._on_removed is not None and before.kids() - self._keys.kids():
            self._on_removed()

    async def get(self, kid: str | None) -> PyJWK | None:
        return self._keys.select(kid)

    async def refresh(self) -> None:
        if self._loader is not None:
            jwks = self._loader()
            if asyncio.iscoroutine(jwks):
                jwks = await jwks
            self.publish(jwks)


# --- issuers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimMapping:
    """How an issuer's claims become an ActorContext. Paths may be dotted
    (`realm_access.roles`). `tenant_id` fixes the tenant for single-tenant IdPs."""

    tenant_claim: str = "tid"
    tenant_id: str | None = None
    roles_claim: str = "roles"
    scope_claim: str | None = "scope"
    subject_type_claim: str | None = "ptype"
    default_subject_type: PrincipalType = PrincipalType.USER


class TrustedIssuer:
    """One `iss` we accept, with its audiences, keys and claim mapping."""

    def __init__(
        self,
        issuer: str,
        audiences: Iterable[str],
        keys: KeySource,
        mapping: ClaimMapping = ClaimMapping(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self.audiences = list(audiences)
        self.keys = keys
        self.mapping = mapping
        self._clock = clock
        self._refreshing: asyncio.Task[None] | None = None
        self._last_refresh = float("-inf")

    async def key(self, kid: str | None) -> PyJWK | None:
        """The key for `kid`, refreshing the source once (single-flight) if it is unknown."""
        found = await self.keys.get(kid)
        if found is None and await self._refresh():
            found = await self.keys.get(kid)
        return found

    async def _refresh(self) -> bool:
        if self._refreshing is None:
            if self._clock() - self._last_refresh < _REFRESH_INTERVAL:
                return False
            self._last_refresh = self._clock()
            self._refreshing = asyncio.create_task(self.keys.refresh())
            self._refreshing.add_done_callback(self._refreshed)
        try:
            await asyncio.shield(self._refreshing)
        except Exception as exc:  # a broken source means "key unknown", never a crash
            _log.warning(
                "key refresh failed", extra={"issuer": self.issuer, "error": type(exc).__name__}
            )
            return False
        return True

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refreshing = None
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as never retrieved


def load_trusted_issuers(path: Path) -> list[TrustedIssuer]:
    """Parse the TRUSTPLANE_TRUSTED_ISSUERS_FILE (format in docs/authentication.md)."""
    entries = json.loads(path.read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of issuers")
    return [_issuer_from(entry, path.parent) for entry in entries]


def _issuer_from(entry: dict[str, Any], base: Path) -> TrustedIssuer:
    jwks = Path(entry["jwks_file"])
    mapping = ClaimMapping(
        tenant_claim=entry.get("tenant_claim", "tid"),
        tenant_id=entry.get("tenant_id"),
        roles_claim=entry.get("roles_claim", "roles"),
        scope_claim=entry.get("scope_claim"),
        subject_type_claim=entry.get("subject_type_claim"),
        default_subject_type=PrincipalType(entry.get("subject_type", "user")),
    )
    audiences = entry["audiences"]
    if not isinstance(audiences, list) or not audiences:
        raise ValueError(f"issuer {entry['issuer']!r}: audiences must be a non-empty list")
    return TrustedIssuer(
        entry["issuer"],
        audiences,
        JwksFileSource(jwks if jwks.is_absolute() else base / jwks),
        mapping,
    )


# --- the verifier ----------------------------------------------------------------------------


class TokenVerifier:
    """Verifies bearer JWTs against the trusted issuers; see the module docstring."""

    def __init__(
        self,
        issuers: Iterable[TrustedIssuer],
        *,
        leeway: float,
        cache_size: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._issuers = {issuer.issuer: issuer for issuer in issuers}
        self._leeway = leeway
        self._cache_size = cache_size
        self._clock = clock
        self._verified: OrderedDict[bytes, ActorContext] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def stats(self) -> dict[str, float]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._verified)}

    def forget(self) -> None:
        """Drop every verified token (a key they may have been verified with is gone)."""
        self._verified.clear()

    async def start(self) -> None:
        """Load every issuer's keys once; a broken source fails start-up loudly."""
        for issuer in self._issuers.values():
            await issuer.keys.refresh()

    async def verify(self, token: str) -> ActorContext:
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._verified.get(digest)
        if cached is not None:
            if self._clock() < cached.expires_at:
                self._verified.move_to_end(digest)
                self.hits += 1
                return cached
            del self._verified[digest]
        self.misses += 1
        actor = await self._verify(token)
        self._remember(digest, actor)
        return actor

    def _remember(self, digest: bytes, actor: ActorContext) -> None:
        if self._cache_size <= 0:
            return
        self._verified[digest] = actor
        if len(self._verified) > self._cache_size:
            self._verified.popitem(last=False)

    async def _verify(self, token: str) -> ActorContext:
        header, unverified = _peek(token)
        algorithm = header.get("alg")
        if algorithm not in ALLOWED_ALGORITHMS:
            raise TokenSignatureInvalid("token algorithm is not allowed")
        issuer = self._issuers.get(unverified.get("iss"))  # type: ignore[arg-type]
        if issuer is None:
            raise TokenIssuerInvalid()
        key = await issuer.key(header.get("kid"))
        if key is None or key.algorithm_name != algorithm:
            raise TokenSignatureInvalid("token is not signed by a known key")
        claims = self._decode(token, key, algorithm, issuer)
        return to_actor(claims, issuer)

    def _decode(
        self, token: str, key: PyJWK, algorithm: str, issuer: TrustedIssuer
    ) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                audience=issuer.audiences,
                issuer=issuer.issuer,
                leeway=self._leeway,
                options={"require": _REQUIRED_CLAIMS, "strict_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired() from None
        except jwt.ImmatureSignatureError:
            raise TokenNotYetValid() from None
        except jwt.InvalidAudienceError:
            raise TokenAudienceInvalid() from None
        except jwt.InvalidIssuerError:
            raise TokenIssuerInvalid() from None
        except jwt.InvalidSignatureError:
            raise TokenSignatureInvalid() from None
        except jwt.MissingRequiredClaimError as exc:
            raise CredentialsMalformed(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidTokenError:
            raise CredentialsMalformed("token is malformed") from None


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims before verification: only to choose the issuer and key."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise CredentialsMalformed("token is not a JWT") from None
    return header, claims


def to_actor(claims: Mapping[str, Any], issuer: TrustedIssuer) -> ActorContext:
    """Map verified claims to the caller's ActorContext using the issuer's mapping."""
    mapping = issuer.mapping
    tenant = mapping.tenant_id or _claim(claims, mapping.tenant_claim)
    if not isinstance(tenant, str) or not tenant or tenant.startswith("_"):
        # Tenant ids starting with "_" are reserved for the server's own keys and records.
        raise CredentialsMalformed("token names no valid tenant")
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject:
        raise CredentialsMalformed("token subject is empty")
    return ActorContext(
        tenant_id=tenant,
        subject=subject,
        subject_type=_subject_type(claims, mapping),
        auth_method=AuthMethod.JWT,
        roles=frozenset(_strings(_claim(claims, mapping.roles_claim))),
        scopes=_scopes(claims, mapping),
        act=_act_chain(claims.get("act")),
        session_id=_optional_str(claims.get("sid")),
        agent_session_id=_optional_str(claims.get("asid")),
        derived_from=_derived_from(claims.get("derived_from")),
        token_id=_optional_str(claims.get("jti")),
        issuer=issuer.issuer,
        issued_at=float(claims["iat"]),
        expires_at=float(claims["exp"]),
    )


# A delegated token names the credentials it derives from, two per link of its chain (at most
# TRUSTPLANE_DELEGATION_MAX_DEPTH, itself at most 8): more is not a token we issued, and each
# name costs a revocation lookup on every call.
_MAX_DERIVED_FROM = 32


def _derived_from(value: Any) -> tuple[str, ...]:
    found = _strings(value)
    if len(found) > _MAX_DERIVED_FROM:
        raise CredentialsMalformed("token derived_from is too long")
    return tuple(found)


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise CredentialsMalformed("token roles, scopes or derived_from are malformed")


def _scopes(claims: Mapping[str, Any], mapping: ClaimMapping) -> frozenset[str] | None:
    if mapping.scope_claim is None:
        return None
    value = _claim(claims, mapping.scope_claim)
    return None if value is None else frozenset(_strings(value))


def _subject_type(claims: Mapping[str, Any], mapping: ClaimMapping) -> PrincipalType:
    raw = _claim(claims, mapping.subject_type_claim) if mapping.subject_type_claim else None
    if raw is None:
        return mapping.default_subject_type
    try:
        return PrincipalType(raw)
    except ValueError:
        raise CredentialsMalformed("token principal type is unknown") from None


def _act_chain(act: Any) -> tuple[DelegateActor, ...]:
    """RFC 8693 nesting: the outermost `act` is the current actor, nested ones prior actors;
    the tuple keeps that order."""
    chain: list[DelegateActor] = []
    while act is not None:
        if not isinstance(act, Mapping) or not isinstance(act.get("sub"), str):
            raise CredentialsMalformed("token act claim is malformed")
        if len(chain) >= _MAX_ACT_DEPTH:
            raise CredentialsMalformed("token delegation chain is too deep")
        kind = act.get("ptype", PrincipalType.AGENT.value)
        try:
            chain.append(DelegateActor(act["sub"], PrincipalType(kind)))
        except ValueError:
            raise CredentialsMalformed("token act claim is malformed") from None
        act = act.get("act")
    return tuple(chain)


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
