"""The ciphertext format, byte for byte (docs/ciphertext-format.md), and AES-256-GCM under it.

    offset  size  field
    0       1     format version, 0x01
    1       16    key id (the key's UUID, 16 raw bytes)
    17      4     key version, unsigned big-endian
    21      16    subkey salt
    37      12    nonce: 4 zero bytes || 8-byte big-endian counter
    49      n+16  AES-256-GCM ciphertext || 16-byte tag

The message key is `HKDF-SHA256(ikm = version key, salt = subkey salt, info = INFO)`. Each
process draws a fresh random 128-bit salt per key version and counts nonces up from 0 under
that subkey, so a (subkey, nonce) pair never repeats: nonce reuse is impossible by
construction, with no birthday bound on the number of messages. The associated data
authenticated by GCM is the 49-byte header, then the tenant id and the caller's associated
data, each length-prefixed — so a ciphertext moved to another tenant, key or version, or
presented with other associated data, fails to decrypt.
"""

from __future__ import annotations

import itertools
import os
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FORMAT_VERSION = 1
HEADER_SIZE = 49
TAG_SIZE = 16
INFO = b"trustplane/ciphertext/v1"
_HEADER = struct.Struct(">B16sI16s12s")
_MAX_COUNTER = 2**64 - 1


class CiphertextError(ValueError):
    """Malformed, altered, or presented with the wrong associated data (deliberately vague)."""


@dataclass(frozen=True)
class Header:
    key_id: str
    key_version: int
    salt: bytes
    nonce: bytes

    def pack(self) -> bytes:
        return _HEADER.pack(
            FORMAT_VERSION, uuid.UUID(self.key_id).bytes, self.key_version, self.salt, self.nonce
        )


def parse(ciphertext: bytes) -> tuple[Header, bytes]:
    """Split a ciphertext into its header and the GCM ciphertext+tag."""
    if len(ciphertext) < HEADER_SIZE + TAG_SIZE or ciphertext[0] != FORMAT_VERSION:
        raise CiphertextError("not a trustplane ciphertext")
    _, key_id, version, salt, nonce = _HEADER.unpack_from(ciphertext)
    return Header(str(uuid.UUID(bytes=key_id)), version, salt, nonce), ciphertext[HEADER_SIZE:]


def associated_data(header: bytes, tenant_id: str, user_data: bytes) -> bytes:
    tenant = tenant_id.encode()
    return (
        header
        + struct.pack(">I", len(tenant))
        + tenant
        + struct.pack(">I", len(user_data))
        + user_data
    )


def derive_subkey(version_key: bytes, salt: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, INFO).derive(version_key)


class Sealer:
    """Encrypts under one key version in this process: its own salt, a counter for nonces.

    The header up to the nonce is the same for every message, so it is packed once; per
    message the work is a counter step, two concatenations and AES-GCM. asyncio runs one
    coroutine at a time and `next()` on a count is atomic, so no lock is needed.
    """

    def __init__(self, key_id: str, key_version: int, version_key: bytes) -> None:
        self.key_id = key_id
        self.key_version = key_version
        salt = os.urandom(16)
        self._aead = AESGCM(derive_subkey(version_key, salt))
        self._prefix = Header(key_id, key_version, salt, bytes(12)).pack()[:37] + b"\0\0\0\0"
        self._counter = itertools.count()

    def seal(self, tenant_id: str, plaintext: bytes, user_data: bytes) -> bytes:
        return self.seal_many(tenant_id, ((plaintext, user_data),))[0]

    def seal_many(self, tenant_id: str, items: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
        """Seal each (plaintext, associated data); the per-item work is kept minimal because
        BatchEncrypt spends most of its time here."""
        tenant = tenant_id.encode()
        tenant_part = len(tenant).to_bytes(4, "big") + tenant
        prefix, encrypt, counter = self._prefix, self._aead.encrypt, self._counter
        sealed = []
        for plaintext, user_data in items:
            number = next(counter)
            if number > _MAX_COUNTER:
                raise OverflowError("nonce space of this process's subkey is exhausted")
            nonce_tail = number.to_bytes(8, "big")
            header = prefix + nonce_tail
            aad = b"".join((header, tenant_part, len(user_data).to_bytes(4, "big"), user_data))
            sealed.append(header + encrypt(b"\0\0\0\0" + nonce_tail, plaintext, aad))
        return sealed


def nonce_for(counter: int) -> bytes:
    return b"\0\0\0\0" + counter.to_bytes(8, "big")


def seal_at(
    subkey: AESGCM, header: Header, tenant_id: str, plaintext: bytes, user_data: bytes
) -> bytes:
    """Encrypt with an explicit header (the Sealer picks salt and nonce; test vectors fix them)."""
    packed = header.pack()
    return packed + subkey.encrypt(
        header.nonce, plaintext, associated_data(packed, tenant_id, user_data)
    )


def open_sealed(ciphertext: bytes, tenant_id: str, user_data: bytes, subkey: AESGCM) -> bytes:
    """Decrypt with the subkey derived for the ciphertext's (version, salt)."""
    header, body = ciphertext[:HEADER_SIZE], ciphertext[HEADER_SIZE:]
    try:
        return subkey.decrypt(header[37:], body, associated_data(header, tenant_id, user_data))
    except InvalidTag:
        raise CiphertextError("decryption failed") from None
