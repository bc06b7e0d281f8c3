"""Key material per algorithm: generation, signing, MACs, public-key export (PEM and JWK)."""

from __future__ import annotations

import hmac
import json
import os
from hashlib import sha256
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from server.crypto.model import Algorithm

JWS_ALG = {Algorithm.ED25519: "EdDSA", Algorithm.ECDSA_P256_SHA256: "ES256"}


def generate(algorithm: Algorithm) -> bytes:
    """New key material, serialized (raw 32 bytes, or PKCS#8 DER for ECDSA)."""
    if algorithm in (Algorithm.AES_256_GCM, Algorithm.HMAC_SHA256):
        return os.urandom(32)
    if algorithm is Algorithm.ED25519:
        return ed25519.Ed25519PrivateKey.generate().private_bytes_raw()
    private = ec.generate_private_key(ec.SECP256R1())
    return private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def private_key(algorithm: Algorithm, material: bytes) -> Any:
    if algorithm is Algorithm.ED25519:
        return ed25519.Ed25519PrivateKey.from_private_bytes(material)
    return serialization.load_der_private_key(material, password=None)


def sign(algorithm: Algorithm, key: Any, message: bytes) -> bytes:
    if algorithm is Algorithm.ED25519:
        return bytes(key.sign(message))
    return bytes(key.sign(message, ec.ECDSA(hashes.SHA256())))


def jws_signature(algorithm: Algorithm, key: Any, signing_input: bytes) -> bytes:
    """A JWS signature (RFC 7515/7518): Ed25519 raw, ES256 as the 64-byte r || s."""
    signature = sign(algorithm, key, signing_input)
    if algorithm is Algorithm.ED25519:
        return signature
    r, s = decode_dss_signature(signature)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def verify(algorithm: Algorithm, key: Any, message: bytes, signature: bytes) -> bool:
    public = key.public_key()
    try:
        if algorithm is Algorithm.ED25519:
            public.verify(signature, message)
        else:
            public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def mac(material: bytes, data: bytes) -> bytes:
    return hmac.new(material, data, sha256).digest()


def verify_mac(material: bytes, data: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(mac(material, data), tag)


def public_pem(key: Any) -> str:
    pem: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode()


def public_jwk(algorithm: Algorithm, key: Any, kid: str) -> dict[str, Any]:
    codec = OKPAlgorithm if algorithm is Algorithm.ED25519 else ECAlgorithm
    jwk: dict[str, Any] = json.loads(codec.to_jwk(key.public_key()))
    jwk.update(kid=kid, alg=JWS_ALG[algorithm], use="sig")
    return jwk
