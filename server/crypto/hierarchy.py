"""The key hierarchy: root keys wrap tenant key-encryption keys (KEKs), which wrap every key
version's material. PostgreSQL only ever holds wrapped bytes.

Root keys come from TRUSTPLANE_ROOT_KEY (base64, several separated by commas) or
TRUSTPLANE_ROOT_KEY_FILE (one base64 key per line, re-read when it changes); the first is the
primary, the rest can still unwrap (during a root rotation). With neither set,
`<data_dir>/root.key` is used, generated on first start with mode 0600. Each root key has a
short id (a hash of it) stored with every KEK it wraps, so the right one is picked and a server
started with the wrong root key refuses instead of producing garbage. Wrapping is AES-256-GCM
with a random nonce and the tenant (and key/version) bound as associated data; wraps are rare
(one per tenant KEK and per key version), far below the random-nonce bound.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from trustplane.common.v1 import error_reason_pb2 as reasons

from server.errors import FailedPrecondition

_log = logging.getLogger("trustplane.crypto")
KEY_BYTES = 32


class RootKeyUnavailable(FailedPrecondition):
    reason = reasons.ERROR_REASON_ROOT_KEY_UNAVAILABLE
    default_message = "key material cannot be unwrapped with the configured root keys"


def root_key_id(key: bytes) -> str:
    return hashlib.sha256(b"trustplane/root-key-id\0" + key).hexdigest()[:16]


def parse_keys(text: str, source: str) -> list[bytes]:
    """Base64 keys separated by commas or newlines; each must be 32 bytes."""
    keys = []
    for item in text.replace(",", "\n").split():
        try:
            key = base64.b64decode(item, validate=True)
        except binascii.Error:
            raise ValueError(f"{source}: not base64") from None
        if len(key) != KEY_BYTES:
            raise ValueError(f"{source}: a root key must be 32 bytes, got {len(key)}")
        keys.append(key)
    if not keys:
        raise ValueError(f"{source}: no key")
    return keys


def generate_key_file(path: Path) -> bool:
    """Create a root key file readable by this user only; False when another process (a
    second worker starting at the same moment) created it first, whose key then stands.

    The key is written to a file of its own and then hard-linked into place: the link either
    appears complete or fails because the path exists, so no process ever reads a half-written
    key file, and exactly one key is generated however many workers start together."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.b64encode(os.urandom(KEY_BYTES)).decode() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
    finally:
        temporary.unlink(missing_ok=True)
    _log.warning(
        "generated a new root key; back it up: without it nothing can be decrypted",
        extra={"path": str(path)},
    )
    return True


def add_primary_key(path: Path) -> None:
    """Put a new random key first in a root key file; the old ones stay, to unwrap."""
    old = path.read_text() if path.exists() else ""
    fresh = base64.b64encode(os.urandom(KEY_BYTES)).decode()
    temporary = path.with_suffix(".new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(fresh + "\n" + old)
    os.replace(temporary, path)
    _log.warning("added a new primary root key; back up the file", extra={"path": str(path)})


class RootKeys:
    """The loaded root keys; `reload` re-reads the source (a rotation done elsewhere).

    A key file is watched: before every wrap and unwrap (rare — a tenant KEK is unwrapped once
    per cache TTL, wrapped once per tenant) its identity and modification time are compared
    with those it was loaded from, and a changed file is read again. So after `keys
    rotate-root --generate` a running server wraps new tenant KEKs under the new primary at
    once, and a root key removed from the file is forgotten, with no restart and no message.
    A file that cannot be read or parsed keeps the keys loaded before (and is logged).
    """

    def __init__(
        self, load: Callable[[], list[bytes]], stamp: Callable[[], object] | None = None
    ) -> None:
        self._load = load
        self._stamp = stamp
        self._loaded: object = None
        self._keys: dict[str, bytes] = {}
        self.primary_id = ""
        self.reload()

    @classmethod
    def from_config(cls, env_value: str | None, key_file: Path | None, data_dir: Path) -> RootKeys:
        if env_value:
            return cls(lambda: parse_keys(env_value, "TRUSTPLANE_ROOT_KEY"))
        path = key_file or data_dir / "root.key"
        if key_file is None and not path.exists():
            generate_key_file(path)
        return cls(lambda: parse_keys(path.read_text(), str(path)), lambda: _file_stamp(path))

    def reload(self) -> None:
        stamp = self._stamp() if self._stamp is not None else None  # before reading: a change
        keys = self._load()  # made while we read is seen next time
        self._keys = {root_key_id(key): key for key in keys}
        self.primary_id = root_key_id(keys[0])
        self._loaded = stamp

    def _follow_file(self) -> None:
        """Re-read a key file that changed since it was loaded."""
        if self._stamp is None or self._stamp() == self._loaded:
            return
        before = self.primary_id
        try:
            self.reload()
        except (OSError, ValueError) as exc:
            _log.warning(
                "root key file changed but cannot be read; keeping the keys loaded: %s", exc
            )
            return
        if self.primary_id != before:
            _log.warning(
                "root key file changed: new tenant KEKs are wrapped under a new primary root key",
                extra={"root_key_id": self.primary_id},
            )

    def wrap(self, material: bytes, context: bytes) -> tuple[str, bytes]:
        """Wrap under the primary root key: (root key id, nonce || ciphertext)."""
        self._follow_file()
        return self.primary_id, seal(self._keys[self.primary_id], material, context)

    def unwrap(self, root_id: str, wrapped: bytes, context: bytes) -> bytes:
        self._follow_file()
        key = self._keys.get(root_id)
        if key is None and self._stamp is None:
            self.reload()  # an environment value cannot change, but a loader may
            key = self._keys.get(root_id)
        if key is None:
            raise RootKeyUnavailable()
        return unseal(key, wrapped, context)

    def derive(self, label: bytes) -> bytes:
        """A secret for another purpose (page tokens), derived from the primary root key."""
        return hmac.new(
            self._keys[self.primary_id], b"trustplane/derive\0" + label, hashlib.sha256
        ).digest()

    def knows(self, root_id: str) -> bool:
        return root_id in self._keys


def _file_stamp(path: Path) -> object:
    """What changes when a file is replaced or rewritten (None when it is missing)."""
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


def seal(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, context)


def unseal(key: bytes, wrapped: bytes, context: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(wrapped[:12], wrapped[12:], context)
    except InvalidTag:
        raise RootKeyUnavailable("wrapped key material failed authentication") from None


def kek_context(tenant_id: str) -> bytes:
    return b"trustplane/kek/v1\0" + tenant_id.encode()


def version_context(tenant_id: str, key_id: str, version: int) -> bytes:
    return f"trustplane/key-version/v1\0{tenant_id}\0{key_id}\0{version}".encode()
