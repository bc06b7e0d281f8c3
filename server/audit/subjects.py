"""Personal data in the audit log: one key per data subject, destroyed to erase (crypto-shredding).

An appended event may carry `personal_data` about a `data_subject` (a user id, an email). The
log never stores either in the clear:

* The subject is looked up by HMAC-SHA-256 of its identifier under a server MAC key
  (`_audit/subjects` in the Crypto keyring), which finds its row in `audit_subjects` and its
  random reference `ref`. Entries carry only `ref`.
* The personal data (canonical JSON of the map) is encrypted with the subject's own AES-256-GCM
  key, `subject-<ref>` in the Crypto keyring of the pseudo-tenant `_subjects.<tenant>` (so it
  is neither listed nor usable through the tenant's CryptoService), with the log id and `ref`
  as associated data. The ciphertext is part of the entry body, so the leaf hash covers it.

Erasure destroys the subject's key at once (`KeyManager.shred`) and then clears the HMAC from
its row: the ciphertexts stay where they are and every proof still verifies, but nothing can
decrypt them, and nothing links the subject to `ref` any more. Later events about the same
subject get a new reference and a new key.

Races: an append that looked up `ref` just before an erasure fails to encrypt (the key is
destroyed) and looks the subject up again, so it lands under a fresh key, never under the
erased one.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Protocol

from server.audit.model import log_id
from server.crypto.model import Algorithm, Key, Purpose
from server.errors import FailedPrecondition, NotFound

MAC_TENANT = "_audit"
MAC_KEY = "subjects"


class SubjectKeyring(Protocol):
    """The Crypto service operations personal data needs (KeyManager)."""

    async def ensure_key(
        self, tenant_id: str, name: str, purpose: Purpose, algorithm: Algorithm | None = None
    ) -> Key: ...
    async def mac(self, tenant_id: str, name: str, data: bytes) -> tuple[bytes, int]: ...
    async def encrypt(
        self, tenant_id: str, name: str, plaintext: bytes, aad: bytes
    ) -> tuple[bytes, int]: ...
    async def decrypt(
        self, tenant_id: str, name: str, data: bytes, aad: bytes
    ) -> tuple[bytes, int]: ...
    async def shred(self, tenant_id: str, name: str) -> int: ...


class SubjectStore(Protocol):
    async def subject_ref(
        self, tenant_id: str, subject_mac: bytes, *, create: bool
    ) -> str | None: ...
    async def forget_subject(self, tenant_id: str, ref: str, now_ms: int) -> int: ...


def key_tenant(tenant_id: str) -> str:
    """The reserved keyring that holds a tenant's subject keys."""
    return f"_subjects.{tenant_id}"


def key_name(ref: str) -> str:
    return f"subject-{ref}"


def _aad(tenant_id: str, ref: str) -> bytes:
    return f"{log_id(tenant_id)}\0{ref}".encode()


class Subjects:
    """Encrypt, decrypt and erase personal data per data subject; see the module docstring."""

    def __init__(self, keyring: SubjectKeyring, store: SubjectStore) -> None:
        self._keyring = keyring
        self._store = store
        self._mac_ready = False

    async def _mac(self, subject: str) -> bytes:
        if not self._mac_ready:
            await self._keyring.ensure_key(MAC_TENANT, MAC_KEY, Purpose.MAC)
            self._mac_ready = True
        tag, _version = await self._keyring.mac(MAC_TENANT, MAC_KEY, subject.encode())
        return tag

    async def ref(self, tenant_id: str, subject: str) -> str | None:
        """The current reference of a subject, None if the log holds no personal data of it."""
        return await self._store.subject_ref(tenant_id, await self._mac(subject), create=False)

    async def seal(
        self, tenant_id: str, subject: str, personal: Mapping[str, str], now_ms: int
    ) -> tuple[str, str]:
        """Encrypt `personal` for `subject`: returns (ref, base64 ciphertext)."""
        plaintext = json.dumps(dict(personal), sort_keys=True, separators=(",", ":")).encode()
        mac = await self._mac(subject)
        for attempt in range(2):
            ref = await self._store.subject_ref(tenant_id, mac, create=True)
            assert ref is not None
            await self._keyring.ensure_key(
                key_tenant(tenant_id), key_name(ref), Purpose.ENCRYPT_DECRYPT
            )
            try:
                sealed, _version = await self._keyring.encrypt(
                    key_tenant(tenant_id), key_name(ref), plaintext, _aad(tenant_id, ref)
                )
            except FailedPrecondition:  # erased meanwhile: its row is being unlinked
                if attempt:
                    raise
                await self._store.forget_subject(tenant_id, ref, now_ms)
                continue
            return ref, base64.b64encode(sealed).decode()
        raise AssertionError("unreachable")

    async def open(self, tenant_id: str, ref: str, sealed: str) -> dict[str, str] | None:
        """The personal data, or None when its subject was erased."""
        try:
            plaintext, _version = await self._keyring.decrypt(
                key_tenant(tenant_id), key_name(ref), base64.b64decode(sealed), _aad(tenant_id, ref)
            )
        except (FailedPrecondition, NotFound):
            return None
        data: dict[str, str] = json.loads(plaintext)
        return data

    async def erase(self, tenant_id: str, subject: str, now_ms: int) -> int:
        """Destroy the subject's key, then unlink it; returns how many entries it affects."""
        ref = await self.ref(tenant_id, subject)
        if ref is None:
            return 0
        await self._keyring.shred(key_tenant(tenant_id), key_name(ref))
        return await self._store.forget_subject(tenant_id, ref, now_ms)
