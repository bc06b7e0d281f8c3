"""A test identity provider: signing keys, a JWKS file, a trusted-issuers file, tokens."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

AUDIENCE = "trustplane"
TENANT = "11111111-1111-4111-8111-111111111111"
OTHER_TENANT = "22222222-2222-4222-8222-222222222222"


def new_private_key(algorithm: str) -> Any:
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(algorithm)


def public_jwk(private_key: Any, algorithm: str, kid: str) -> dict[str, Any]:
    public = private_key.public_key()
    codec = {"EdDSA": OKPAlgorithm, "ES256": ECAlgorithm, "RS256": RSAAlgorithm}[algorithm]
    jwk: dict[str, Any] = json.loads(codec.to_jwk(public))  # type: ignore[attr-defined]
    jwk.update(kid=kid, use="sig", alg=algorithm)
    return jwk


class TestIdP:
    """An external issuer the server is configured to trust (as a Keycloak realm would be)."""

    __test__ = False

    def __init__(self, directory: Path, issuer: str = "https://idp.test/realms/acme") -> None:
        self.directory = directory
        self.issuer = issuer
        self.keys: dict[str, tuple[Any, str]] = {}
        self.jwks_file = directory / "jwks.json"
        self.issuers_file = directory / "issuers.json"
        self.add_key("key-1", "EdDSA")
        self.issuers_file.write_text(
            json.dumps(
                [
                    {
                        "issuer": issuer,
                        "audiences": [AUDIENCE],
                        "jwks_file": str(self.jwks_file),
                        "tenant_claim": "tid",
                        "roles_claim": "roles",
                        "scope_claim": "scope",
                        "subject_type_claim": "ptype",
                    }
                ]
            )
        )

    def add_key(self, kid: str, algorithm: str) -> None:
        self.keys[kid] = (new_private_key(algorithm), algorithm)
        self.publish()

    def publish(self) -> None:
        keys = [public_jwk(key, alg, kid) for kid, (key, alg) in self.keys.items()]
        self.jwks_file.write_text(json.dumps({"keys": keys}))

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "user-1",
            "tid": TENANT,
            "roles": ["member"],
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, kid: str = "key-1", key: Any = None, **claims: Any) -> str:
        private, algorithm = self.keys.get(kid, (None, "EdDSA"))
        return jwt.encode(
            self.claims(**claims), key or private, algorithm=algorithm, headers={"kid": kid}
        )


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
