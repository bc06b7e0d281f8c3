"""Crypto domain types (stdlib only)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from server import wire


class Purpose(enum.Enum):
    ENCRYPT_DECRYPT = "encrypt_decrypt"
    SIGN_VERIFY = "sign_verify"
    MAC = "mac"


class Algorithm(enum.Enum):
    AES_256_GCM = "aes_256_gcm"
    ED25519 = "ed25519"
    ECDSA_P256_SHA256 = "ecdsa_p256_sha256"
    HMAC_SHA256 = "hmac_sha256"


ALGORITHMS: dict[Purpose, tuple[Algorithm, ...]] = {
    Purpose.ENCRYPT_DECRYPT: (Algorithm.AES_256_GCM,),
    Purpose.SIGN_VERIFY: (Algorithm.ED25519, Algorithm.ECDSA_P256_SHA256),
    Purpose.MAC: (Algorithm.HMAC_SHA256,),
}


class VersionState(enum.Enum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    DESTROY_SCHEDULED = "destroy_scheduled"
    DESTROYED = "destroyed"


USAGE_KINDS = ("encrypt", "decrypt", "sign", "verify", "mac", "verify_mac")


@dataclass(frozen=True)
class KeyVersion:
    version: int
    state: VersionState
    created_at: float
    destroy_at: float | None = None
    usage: dict[str, int] = field(default_factory=dict, compare=False)

    def kid(self, key_id: str) -> str:
        return f"{key_id}.{self.version}"


@dataclass(frozen=True)
class Key:
    """A tenant's named key (without material)."""

    tenant_id: str
    key_id: str
    name: str
    purpose: Purpose
    algorithm: Algorithm
    primary_version: int
    min_decryption_version: int
    rotation_period: float | None
    next_rotation_at: float | None
    labels: dict[str, str]
    revision: int
    created_at: float
    updated_at: float
    versions: tuple[KeyVersion, ...] = ()

    @property
    def etag(self) -> str:
        return wire.etag(self.key_id[:8], self.revision)

    def version(self, number: int) -> KeyVersion | None:
        for candidate in self.versions:
            if candidate.version == number:
                return candidate
        return None


@dataclass(frozen=True)
class KeyPatch:
    """UpdateKey's masked fields; None means "not in the mask"."""

    labels: dict[str, str] | None = None
    rotation_period: float | None = None
    clear_rotation: bool = False
    min_decryption_version: int | None = None
