"""Known answers for the primitives, the documented test vectors, and format properties."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from server.crypto import ciphertext, primitives
from server.crypto.model import Algorithm

DOC = Path(__file__).resolve().parents[2] / "docs" / "ciphertext-format.md"

# The GCM specification's test cases 13, 14 and 16 (McGrew & Viega; NIST SP 800-38D suite).
GCM = [
    ("00" * 32, "00" * 12, "", "", "", "530f8afbc74536b9a963b4f1c4cb738b"),
    (
        "00" * 32,
        "00" * 12,
        "00" * 16,
        "",
        "cea7403d4d606b6e074ec5d3baf39d18",
        "d0d1c8a799996bf0265b98b5d48ab919",
    ),
    (
        "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
        "cafebabefacedbaddecaf888",
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e24"
        "49a6b525b16aedf5aa0de657ba637b39",
        "feedfacedeadbeeffeedfacedeadbeefabaddad2",
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b10"
        "56828838c5f61e6393ba7a0abcc9f662",
        "76fc6ece0f4e1768cddf8853bb2d551b",
    ),
]

# RFC 8032 §7.1, tests 1 and 2.
ED25519 = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e3970"
        "1cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613"
        "d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
]


@pytest.mark.parametrize(("key", "iv", "plaintext", "aad", "expected", "tag"), GCM)
def test_aes_gcm_known_answers(key, iv, plaintext, aad, expected, tag):
    sealed = AESGCM(bytes.fromhex(key)).encrypt(
        bytes.fromhex(iv), bytes.fromhex(plaintext), bytes.fromhex(aad) or None
    )
    assert sealed.hex() == expected + tag


@pytest.mark.parametrize(("secret", "public", "message", "signature"), ED25519)
def test_ed25519_known_answers(secret, public, message, signature):
    key = primitives.private_key(Algorithm.ED25519, bytes.fromhex(secret))
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    assert key.public_key().public_bytes_raw().hex() == public
    produced = primitives.sign(Algorithm.ED25519, key, bytes.fromhex(message))
    assert produced.hex() == signature
    assert primitives.verify(Algorithm.ED25519, key, bytes.fromhex(message), produced)


def _vectors():
    block = re.search(r"```text\n(.*?)```", DOC.read_text(), re.S)
    assert block, "test vectors missing from docs/ciphertext-format.md"
    vectors = []
    for chunk in block.group(1).split("\n\n"):
        fields = dict(
            (k.strip(), v.strip())
            for k, _, v in (line.partition("=") for line in chunk.splitlines()[1:])
        )
        vectors.append(fields)
    return vectors


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["key_version"])
def test_documented_vectors(vector):
    salt, key = bytes.fromhex(vector["salt"]), bytes.fromhex(vector["version_key"])
    subkey = ciphertext.derive_subkey(key, salt)
    assert subkey.hex() == vector["subkey"]
    header = ciphertext.Header(
        vector["key_id"],
        int(vector["key_version"]),
        salt,
        ciphertext.nonce_for(int(vector["counter"])),
    )
    sealed = ciphertext.seal_at(
        AESGCM(subkey),
        header,
        vector["tenant_id"],
        bytes.fromhex(vector["plaintext"]),
        bytes.fromhex(vector["aad"]),
    )
    assert sealed.hex() == vector["ciphertext"]
    opened = ciphertext.open_sealed(
        sealed, vector["tenant_id"], bytes.fromhex(vector["aad"]), AESGCM(subkey)
    )
    assert opened.hex() == vector["plaintext"]
    with pytest.raises(ciphertext.CiphertextError):
        ciphertext.open_sealed(sealed, "tenant-b", bytes.fromhex(vector["aad"]), AESGCM(subkey))


@given(
    key_id=st.uuids(),
    version=st.integers(0, 2**32 - 1),
    salt=st.binary(min_size=16, max_size=16),
    counter=st.integers(0, 2**64 - 1),
    body=st.binary(min_size=16, max_size=64),
)
def test_parse_inverts_format(key_id, version, salt, counter, body):
    header = ciphertext.Header(str(key_id), version, salt, ciphertext.nonce_for(counter))
    parsed, rest = ciphertext.parse(header.pack() + body)
    assert parsed == header and rest == body


def test_sealer_counts_nonces_and_rejects_foreign_bytes():
    key_id = str(uuid.uuid4())
    sealer = ciphertext.Sealer(key_id, 3, bytes(32))
    first, second = (sealer.seal("t", b"m", b"") for _ in range(2))
    assert first[37:49] == ciphertext.nonce_for(0) and second[37:49] == ciphertext.nonce_for(1)
    assert first[21:37] == second[21:37]  # one salt per process and version
    other = ciphertext.Sealer(key_id, 3, bytes(32))
    assert other.seal("t", b"m", b"")[21:37] != first[21:37]  # another process: another subkey
    for bad in (b"", b"\x02" + first[1:], first[:60]):
        with pytest.raises(ciphertext.CiphertextError):
            ciphertext.parse(bad)
