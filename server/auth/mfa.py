"""TOTP multi-factor authentication (RFC 6238, via pyotp) with single-use recovery codes.

The shared secret is encrypted with the Crypto keyring (`_system/auth-mfa`, associated data =
the principal id) before it reaches PostgreSQL; recovery codes are stored as SHA-256 digests
(they carry 80 random bits, so a fast hash is enough). A TOTP code is accepted within ±1 time
step and at most once: the step it matched is remembered in the cache, so a code seen by an
onlooker cannot be replayed.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from typing import Protocol

import pyotp
from trustplane.common.v1 import error_reason_pb2 as reasons

from server.auth.model import SYSTEM_TENANT, Principal
from server.auth.store import PgAuthStore
from server.cache import Cache
from server.crypto.model import Algorithm, Key, Purpose
from server.errors import FailedPrecondition, FieldViolation, InvalidArgument, Unauthenticated

MFA_KEY = "auth-mfa"
_ISSUER = "trustplane"
_STEP = 30


class MfaRequired(FailedPrecondition):
    reason = reasons.ERROR_REASON_MFA_REQUIRED
    default_message = "this account requires a second factor: send totp_code or recovery_code"


class MfaCodeInvalid(Unauthenticated):
    reason = reasons.ERROR_REASON_MFA_CODE_INVALID
    default_message = "the code is wrong, expired or already used"


class SecretBox(Protocol):
    """The Crypto keyring's encryption API (KeyManager)."""

    async def ensure_key(
        self, tenant_id: str, name: str, purpose: Purpose, algorithm: Algorithm | None = None
    ) -> Key: ...
    async def encrypt(
        self, tenant_id: str, name: str, plaintext: bytes, aad: bytes
    ) -> tuple[bytes, int]: ...
    async def decrypt(
        self, tenant_id: str, name: str, data: bytes, aad: bytes
    ) -> tuple[bytes, int]: ...


class Mfa:
    def __init__(
        self,
        store: PgAuthStore,
        box: SecretBox,
        cache: Cache,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._box = box
        self._cache = cache
        self._clock = clock

    async def start(self) -> None:
        await self._box.ensure_key(SYSTEM_TENANT, MFA_KEY, Purpose.ENCRYPT_DECRYPT)

    async def enroll(self, user: Principal) -> tuple[str, str]:
        if user.mfa_enabled:
            raise FailedPrecondition("MFA is already enabled; disable it first")
        secret = pyotp.random_base32()
        sealed, _ = await self._box.encrypt(
            SYSTEM_TENANT, MFA_KEY, secret.encode(), user.id.encode()
        )
        await self._store.set_mfa_pending(user.id, sealed)
        uri = pyotp.TOTP(secret).provisioning_uri(name=user.email or user.id, issuer_name=_ISSUER)
        return secret, uri

    async def confirm(self, user: Principal, code: str) -> list[str]:
        _, pending = await self._store.mfa_secrets(user.id)
        if pending is None:
            raise FailedPrecondition("no MFA enrolment is pending; call EnrollMfa first")
        if not await self._totp_ok(user.id, pending, code):
            raise _invalid_code()
        codes = [secrets.token_hex(5) for _ in range(10)]
        await self._store.enable_mfa(user.id, [_digest(c) for c in codes])
        return codes

    async def disable(self, user: Principal, code: str) -> None:
        if not user.mfa_enabled:
            raise FailedPrecondition("MFA is not enabled")
        if not await self.check(user, code, code):
            raise _invalid_code()
        await self._store.disable_mfa(user.id)

    async def check(self, user: Principal, totp_code: str, recovery_code: str) -> bool:
        """A login's second factor: a current TOTP code, or an unused recovery code."""
        secret, _ = await self._store.mfa_secrets(user.id)
        if totp_code and secret is not None and await self._totp_ok(user.id, secret, totp_code):
            return True
        if recovery_code:
            return await self._store.use_recovery_code(
                user.id, _digest(recovery_code), self._clock()
            )
        return False

    async def _totp_ok(self, principal_id: str, sealed: bytes, code: str) -> bool:
        secret, _ = await self._box.decrypt(SYSTEM_TENANT, MFA_KEY, sealed, principal_id.encode())
        totp, now = pyotp.TOTP(secret.decode()), self._clock()
        for offset in (-1, 0, 1):
            moment = now + offset * _STEP
            if secrets.compare_digest(totp.at(moment), code.strip()):
                step = int(moment // _STEP)
                return await self._cache.set_if_absent(
                    f"mfa:used:{principal_id}:{step}", b"1", 3 * _STEP
                )
        return False


def _digest(code: str) -> bytes:
    return hashlib.sha256(code.strip().lower().encode()).digest()


def _invalid_code() -> InvalidArgument:
    return InvalidArgument(
        "the code is wrong, expired or already used",
        reason=reasons.ERROR_REASON_MFA_CODE_INVALID,
        field_violations=[FieldViolation("code", "not a current TOTP or unused recovery code")],
    )
