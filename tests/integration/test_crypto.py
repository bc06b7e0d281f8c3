"""CryptoService through the real server: every purpose, lifecycle, isolation, tampering."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import time
import uuid

import asyncpg
import grpc
import jwt
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from google.protobuf import duration_pb2, field_mask_pb2
from trustplane.crypto.v1 import crypto_pb2 as pb

from interceptors.idempotency import scope_key
from server.actor import ActorContext, AuthMethod, PrincipalType
from server.crypto.hierarchy import RootKeyUnavailable, root_key_id
from server.crypto.model import Algorithm
from server.methods import spec_from_descriptor
from tests.support.process import run_server_async, server_env
from tests.support.status import expect_error
from tests.support.tokens import OTHER_TENANT, TENANT, bearer

ENC, SIGN, MAC = pb.KEY_PURPOSE_ENCRYPT_DECRYPT, pb.KEY_PURPOSE_SIGN_VERIFY, pb.KEY_PURPOSE_MAC


@pytest.fixture
def admin(idp):
    return bearer(idp.token(roles=["admin"]))


async def create(running, metadata, name="k", purpose=ENC, **kw):
    request = pb.CreateKeyRequest(request_id=str(uuid.uuid4()), name=name, purpose=purpose, **kw)
    return (await running.crypto.CreateKey(request, metadata=metadata)).key


async def encrypt(running, metadata, plaintext=b"secret", aad=b"ctx", name="k"):
    return await running.crypto.Encrypt(
        pb.EncryptRequest(name=name, plaintext=plaintext, associated_data=aad), metadata=metadata
    )


async def decrypt(running, metadata, ciphertext, aad=b"ctx", name="k"):
    return await running.crypto.Decrypt(
        pb.DecryptRequest(name=name, ciphertext=ciphertext, associated_data=aad),
        metadata=metadata,
    )


async def test_encrypt_decrypt_round_trip_and_aad(server, admin):
    key = await create(server, admin)
    assert key.primary_version == 1 and key.algorithm == pb.KEY_ALGORITHM_AES_256_GCM
    assert [v.state for v in key.versions] == [pb.KEY_VERSION_STATE_ENABLED]
    sealed = await encrypt(server, admin)
    assert sealed.key_version == 1 and b"secret" not in sealed.ciphertext
    opened = await decrypt(server, admin, sealed.ciphertext)
    assert (opened.plaintext, opened.key_version) == (b"secret", 1)
    status = await expect_error(decrypt(server, admin, sealed.ciphertext, aad=b"other"))
    assert (status.code, status.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "CIPHERTEXT_INVALID")


async def test_every_flipped_byte_fails(server, admin):
    await create(server, admin)
    ciphertext = (await encrypt(server, admin, plaintext=b"x" * 20)).ciphertext
    for index in range(len(ciphertext)):
        tampered = bytearray(ciphertext)
        tampered[index] ^= 0x01
        status = await expect_error(decrypt(server, admin, bytes(tampered)))
        assert status.code in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}, index
    truncated = await expect_error(decrypt(server, admin, ciphertext[:40]))
    assert truncated.reason == "CIPHERTEXT_INVALID"


async def test_two_encryptions_never_share_a_nonce(server, admin):
    await create(server, admin)
    first = (await encrypt(server, admin)).ciphertext
    second = (await encrypt(server, admin)).ciphertext
    assert first[37:49] != second[37:49] or first[21:37] != second[21:37]


async def test_cross_tenant_keys_and_ciphertexts_are_not_found(server, idp, admin):
    await create(server, admin)
    sealed = await encrypt(server, admin)
    other = bearer(idp.token(roles=["admin"], tid=OTHER_TENANT))
    status = await expect_error(server.crypto.GetKey(pb.GetKeyRequest(name="k"), metadata=other))
    assert (status.code, status.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    await create(server, other)  # same name in the other tenant: a different key
    status = await expect_error(decrypt(server, other, sealed.ciphertext))
    assert status.code is grpc.StatusCode.NOT_FOUND
    await create(server, admin, name="only-a")
    mine = await server.crypto.ListKeys(pb.ListKeysRequest(), metadata=admin)
    theirs = await server.crypto.ListKeys(pb.ListKeysRequest(), metadata=other)
    assert {k.name for k in mine.keys} == {"k", "only-a"}
    # The other tenant sees exactly its own key "k" and nothing of tenant A's.
    assert [k.name for k in theirs.keys] == ["k"]
    assert not {k.key_id for k in theirs.keys} & {k.key_id for k in mine.keys}


async def test_ciphertext_bound_to_its_key(server, admin):
    await create(server, admin, name="a")
    await create(server, admin, name="b")
    sealed = await encrypt(server, admin, name="a")
    status = await expect_error(decrypt(server, admin, sealed.ciphertext, name="b"))
    assert status.code is grpc.StatusCode.NOT_FOUND


async def test_rotation_keeps_old_ciphertexts_and_min_decryption_version(server, admin):
    await create(server, admin)
    old = (await encrypt(server, admin, plaintext=b"v1")).ciphertext
    rotated = (await server.crypto.RotateKey(pb.RotateKeyRequest(name="k"), metadata=admin)).key
    assert rotated.primary_version == 2 and len(rotated.versions) == 2
    new = await encrypt(server, admin, plaintext=b"v2")
    assert new.key_version == 2
    assert (await decrypt(server, admin, old)).plaintext == b"v1"
    re = await server.crypto.ReEncrypt(
        pb.ReEncryptRequest(name="k", ciphertext=old, associated_data=b"ctx"), metadata=admin
    )
    assert (re.key_version, re.source_key_version) == (2, 1)
    assert (await decrypt(server, admin, re.ciphertext)).plaintext == b"v1"
    update = pb.UpdateKeyRequest(
        key=pb.Key(name="k", min_decryption_version=2, etag=rotated.etag),
        update_mask=field_mask_pb2.FieldMask(paths=["min_decryption_version"]),
    )
    updated = (await server.crypto.UpdateKey(update, metadata=admin)).key
    assert updated.min_decryption_version == 2 and updated.etag != rotated.etag
    status = await expect_error(decrypt(server, admin, old))
    assert (status.code, status.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "KEY_VERSION_TOO_OLD",
    )
    stale = await expect_error(server.crypto.UpdateKey(update, metadata=admin))
    assert (stale.code, stale.reason) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")


async def test_disable_enable_and_primary_protection(server, admin):
    await create(server, admin)
    old = (await encrypt(server, admin)).ciphertext
    await server.crypto.RotateKey(pb.RotateKeyRequest(name="k"), metadata=admin)
    primary = await expect_error(
        server.crypto.DisableKeyVersion(
            pb.DisableKeyVersionRequest(name="k", version=2), metadata=admin
        )
    )
    assert primary.code is grpc.StatusCode.FAILED_PRECONDITION
    disabled = await server.crypto.DisableKeyVersion(
        pb.DisableKeyVersionRequest(name="k", version=1), metadata=admin
    )
    assert disabled.key_version.state == pb.KEY_VERSION_STATE_DISABLED
    status = await expect_error(decrypt(server, admin, old))
    assert status.reason == "KEY_VERSION_DISABLED"
    await server.crypto.EnableKeyVersion(
        pb.EnableKeyVersionRequest(name="k", version=1), metadata=admin
    )
    assert (await decrypt(server, admin, old)).plaintext == b"secret"


async def test_destruction_schedule_cancel_and_execution(start_server, idp):
    now = [time.time()]
    async with start_server(
        clock=lambda: now[0], TRUSTPLANE_CRYPTO_SWEEP_INTERVAL="0.05"
    ) as running:
        admin = bearer(idp.token(roles=["admin"]))
        await create(running, admin)
        old = (await encrypt(running, admin)).ciphertext
        await running.crypto.RotateKey(pb.RotateKeyRequest(name="k"), metadata=admin)
        window = await expect_error(
            running.crypto.ScheduleKeyVersionDestruction(
                pb.ScheduleKeyVersionDestructionRequest(
                    name="k", version=1, pending_window_days=31
                ),
                metadata=admin,
            )
        )
        assert window.field_violations[0][0] == "pending_window_days"
        scheduled = (
            await running.crypto.ScheduleKeyVersionDestruction(
                pb.ScheduleKeyVersionDestructionRequest(name="k", version=1), metadata=admin
            )
        ).key_version
        assert scheduled.state == pb.KEY_VERSION_STATE_DESTROY_SCHEDULED
        assert scheduled.destroy_time.seconds == pytest.approx(now[0] + 7 * 86400, abs=2)
        assert (await expect_error(decrypt(running, admin, old))).reason == "KEY_VERSION_DESTROYED"
        cancelled = (
            await running.crypto.CancelKeyVersionDestruction(
                pb.CancelKeyVersionDestructionRequest(name="k", version=1), metadata=admin
            )
        ).key_version
        assert cancelled.state == pb.KEY_VERSION_STATE_DISABLED
        await running.crypto.ScheduleKeyVersionDestruction(
            pb.ScheduleKeyVersionDestructionRequest(name="k", version=1, pending_window_days=1),
            metadata=admin,
        )
        now[0] += 86400 + 1  # the sweeper carries it out
        await _wait_for_state(running, admin, 1, pb.KEY_VERSION_STATE_DESTROYED)
        status = await expect_error(
            running.crypto.CancelKeyVersionDestruction(
                pb.CancelKeyVersionDestructionRequest(name="k", version=1), metadata=admin
            )
        )
        assert status.code is grpc.StatusCode.FAILED_PRECONDITION
        assert (await expect_error(decrypt(running, admin, old))).reason == "KEY_VERSION_DESTROYED"
        material = await running.app.db.fetchval(
            "SELECT v.wrapped_material FROM crypto_key_versions v JOIN crypto_keys k "
            "ON k.id = v.key_id WHERE v.version = 1 AND k.name = 'k'"
        )
        assert material is None


async def _wait_for_state(running, metadata, version, state):
    async with asyncio.timeout(10):
        while True:
            key = (await running.crypto.GetKey(pb.GetKeyRequest(name="k"), metadata=metadata)).key
            if key.versions[version - 1].state == state:
                return
            await asyncio.sleep(0.05)


async def test_automatic_rotation_by_period(start_server, idp):
    now = [time.time()]
    async with start_server(
        clock=lambda: now[0], TRUSTPLANE_CRYPTO_SWEEP_INTERVAL="0.05"
    ) as running:
        admin = bearer(idp.token(roles=["admin"]))
        key = await create(running, admin, rotation_period=duration_pb2.Duration(seconds=86400))
        assert key.next_rotation_time.seconds == pytest.approx(now[0] + 86400, abs=2)
        now[0] += 86401
        async with asyncio.timeout(10):
            while key.primary_version == 1:
                await asyncio.sleep(0.05)
                key = (await running.crypto.GetKey(pb.GetKeyRequest(name="k"), metadata=admin)).key
        assert key.primary_version == 2
        assert (await encrypt(running, admin)).key_version == 2


@pytest.mark.parametrize(
    ("algorithm", "alg"),
    [(pb.KEY_ALGORITHM_ED25519, "EdDSA"), (pb.KEY_ALGORITHM_ECDSA_P256_SHA256, "ES256")],
)
async def test_sign_verify_and_public_key(server, admin, algorithm, alg):
    await create(server, admin, purpose=SIGN, algorithm=algorithm)
    signed = await server.crypto.Sign(pb.SignRequest(name="k", message=b"msg"), metadata=admin)
    verify = pb.VerifyRequest(
        name="k", message=b"msg", signature=signed.signature, key_version=signed.key_version
    )
    assert (await server.crypto.Verify(verify, metadata=admin)).valid
    verify.message = b"other"
    assert not (await server.crypto.Verify(verify, metadata=admin)).valid
    public = await server.crypto.GetPublicKey(pb.GetPublicKeyRequest(name="k"), metadata=admin)
    jwk = json.loads(public.jwk)
    assert jwk["alg"] == alg and jwk["kid"] == signed.kid
    # Verified offline, with only the public key, as any other language would: from the PEM,
    # and from the JWK's own coordinates.
    from_pem = serialization.load_pem_public_key(public.pem.encode())
    from_jwk = _public_key_from_jwk(jwk)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert from_pem.public_bytes(*spki) == from_jwk.public_bytes(*spki)
    for key in (from_pem, from_jwk):
        _verify_offline(key, algorithm, signed.signature, b"msg")  # raises if invalid
        with pytest.raises(InvalidSignature):
            _verify_offline(key, algorithm, signed.signature, b"other")
    # And as a JOSE library would, with the JWK as published (ES256 wants r || s, not DER).
    jose = jwt.get_algorithm_by_name(alg)
    raw = signed.signature
    if algorithm == pb.KEY_ALGORITHM_ECDSA_P256_SHA256:
        r, s = decode_dss_signature(raw)
        raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert jose.verify(b"msg", jwt.PyJWK(jwk).key, raw)
    assert not jose.verify(b"other", jwt.PyJWK(jwk).key, raw)


def _b64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _public_key_from_jwk(jwk):
    """RFC 8037 (OKP) / RFC 7518 (EC) by hand: no JOSE library involved."""
    if jwk["kty"] == "OKP":
        assert jwk["crv"] == "Ed25519"
        return ed25519.Ed25519PublicKey.from_public_bytes(_b64url(jwk["x"]))
    assert (jwk["kty"], jwk["crv"]) == ("EC", "P-256")
    x, y = (int.from_bytes(_b64url(jwk[c]), "big") for c in ("x", "y"))
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()


def _verify_offline(key, algorithm, signature, message):
    if algorithm == pb.KEY_ALGORITHM_ED25519:
        key.verify(signature, message)
    else:
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))  # DER, as the proto says


async def test_mac_and_verify(server, admin):
    await create(server, admin, purpose=MAC)
    tag = await server.crypto.Mac(pb.MacRequest(name="k", data=b"d"), metadata=admin)
    assert len(tag.mac) == 32
    ok = pb.VerifyMacRequest(name="k", data=b"d", mac=tag.mac, key_version=tag.key_version)
    assert (await server.crypto.VerifyMac(ok, metadata=admin)).valid
    ok.mac = bytes(32)
    assert not (await server.crypto.VerifyMac(ok, metadata=admin)).valid


async def test_purpose_mismatch(server, admin):
    await create(server, admin, purpose=MAC)
    status = await expect_error(encrypt(server, admin))
    assert (status.code, status.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "KEY_PURPOSE_MISMATCH",
    )


async def test_data_keys_and_batches(server, admin):
    await create(server, admin)
    data_key = await server.crypto.GenerateDataKey(
        pb.GenerateDataKeyRequest(name="k", associated_data=b"file-1"), metadata=admin
    )
    assert len(data_key.plaintext) == 32
    assert (await decrypt(server, admin, data_key.ciphertext, aad=b"file-1")).plaintext == (
        data_key.plaintext
    )
    wrapped_only = await server.crypto.GenerateDataKey(
        pb.GenerateDataKeyRequest(name="k", length=16, wrapped_only=True), metadata=admin
    )
    assert wrapped_only.plaintext == b"" and wrapped_only.ciphertext
    items = [pb.EncryptItem(plaintext=bytes([i]) * 10, associated_data=b"a") for i in range(5)]
    sealed = await server.crypto.BatchEncrypt(
        pb.BatchEncryptRequest(name="k", items=items), metadata=admin
    )
    assert [(r.key_version, r.HasField("error")) for r in sealed.results] == [(1, False)] * 5
    decrypt_items = [
        pb.DecryptItem(ciphertext=r.data, associated_data=b"a") for r in sealed.results
    ]
    decrypt_items[2].associated_data = b"wrong"
    opened = await server.crypto.BatchDecrypt(
        pb.BatchDecryptRequest(name="k", items=decrypt_items), metadata=admin
    )
    assert [r.data for r in opened.results] == [
        bytes([i]) * 10 if i != 2 else b"" for i in range(5)
    ]
    assert opened.results[2].error.reason == "CIPHERTEXT_INVALID"
    too_many = await expect_error(
        server.crypto.BatchEncrypt(
            pb.BatchEncryptRequest(name="k", items=items * 201), metadata=admin
        )
    )
    assert too_many.reason == "REQUEST_TOO_LARGE"


async def test_create_validation_duplicates_and_exactly_once(server, admin):
    status = await expect_error(
        server.crypto.CreateKey(
            pb.CreateKeyRequest(
                request_id=str(uuid.uuid4()),
                name="Bad Name!",
                purpose=SIGN,
                algorithm=pb.KEY_ALGORITHM_AES_256_GCM,
            ),
            metadata=admin,
        )
    )
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in status.field_violations} == {"name", "algorithm"}
    request = pb.CreateKeyRequest(request_id=str(uuid.uuid4()), name="k", purpose=ENC)
    first = (await server.crypto.CreateKey(request, metadata=admin)).key
    again = (await server.crypto.CreateKey(request, metadata=admin)).key
    assert first.key_id == again.key_id
    # The replay copy is lost (Redis flushed, or a crash between commit and the cache write):
    # the request_id stored under a unique constraint still returns the same key.
    actor = ActorContext(TENANT, "user-1", PrincipalType.USER, AuthMethod.JWT)
    spec = spec_from_descriptor(
        pb.DESCRIPTOR.services_by_name["CryptoService"].methods_by_name["CreateKey"]
    )
    assert await server.app.cache.delete(scope_key(actor, spec, request.request_id))
    third = server.crypto.CreateKey(request, metadata=admin)
    assert (await third).key.key_id == first.key_id
    assert dict(await third.initial_metadata()).get("idempotency-replayed") is None
    dup = pb.CreateKeyRequest(request_id=str(uuid.uuid4()), name="k", purpose=ENC)
    status = await expect_error(server.crypto.CreateKey(dup, metadata=admin))
    assert (status.code, status.reason) == (grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS")


async def test_list_pages_and_tampered_token(server, admin):
    for name in ("a", "b", "c"):
        await create(server, admin, name=name)
    page = await server.crypto.ListKeys(pb.ListKeysRequest(page_size=2), metadata=admin)
    assert [k.name for k in page.keys] == ["a", "b"] and page.next_page_token
    rest = await server.crypto.ListKeys(
        pb.ListKeysRequest(page_size=2, page_token=page.next_page_token), metadata=admin
    )
    assert [k.name for k in rest.keys] == ["c"] and rest.next_page_token == ""
    forged = page.next_page_token[:-2] + ("AA" if page.next_page_token[-2:] != "AA" else "BB")
    status = await expect_error(
        server.crypto.ListKeys(pb.ListKeysRequest(page_token=forged), metadata=admin)
    )
    assert status.reason == "PAGE_TOKEN_INVALID"


async def test_permissions(server, idp, admin):
    await create(server, admin)
    viewer = bearer(idp.token(roles=["viewer"]))
    member = bearer(idp.token(roles=["member"]))
    assert (await server.crypto.GetKey(pb.GetKeyRequest(name="k"), metadata=viewer)).key.name
    assert (await expect_error(encrypt(server, viewer))).reason == "PERMISSION_DENIED"
    assert (await encrypt(server, member)).key_version == 1
    status = await expect_error(
        server.crypto.RotateKey(pb.RotateKeyRequest(name="k"), metadata=member)
    )
    assert status.metadata == {"permission": "crypto.keys.rotate"}


async def test_random_bytes(server, admin):
    data = await server.crypto.GenerateRandomBytes(
        pb.GenerateRandomBytesRequest(length=64), metadata=admin
    )
    assert len(data.data) == 64
    status = await expect_error(
        server.crypto.GenerateRandomBytes(pb.GenerateRandomBytesRequest(length=0), metadata=admin)
    )
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT


async def test_material_is_stored_wrapped(server, admin):
    await create(server, admin, purpose=MAC)
    tag = (await server.crypto.Mac(pb.MacRequest(name="k", data=b"d"), metadata=admin)).mac
    rows = await server.app.db.pool.fetch(
        "SELECT v.wrapped_material FROM crypto_key_versions v JOIN crypto_keys k "
        "ON k.id = v.key_id WHERE k.tenant_id = $1",
        TENANT,
    )
    kek = await server.app.db.fetchval(
        "SELECT wrapped_kek FROM crypto_tenant_keks WHERE tenant_id = $1", TENANT
    )
    import hashlib
    import hmac

    for row in rows:
        material = bytes(row["wrapped_material"])
        for start in range(len(material) - 31):  # no 32-byte window of it is the HMAC key
            assert hmac.new(material[start : start + 32], b"d", hashlib.sha256).digest() != tag
    assert kek is not None and len(kek) == 12 + 32 + 16


async def test_root_key_rotation_keeps_data_readable(start_server, idp, tmp_path):
    """`keys rotate-root --generate`: new primary root key, every KEK rewrapped, old data
    still readable — by the running server and by a fresh one without the old root key."""
    key_file = tmp_path / "root.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    key_file.chmod(0o600)
    env = {"TRUSTPLANE_ROOT_KEY_FILE": str(key_file), "TRUSTPLANE_KEY_CACHE_TTL": "0"}
    async with start_server(**env) as running:
        admin = bearer(idp.token(roles=["admin"]))
        await create(running, admin)
        sealed = (await encrypt(running, admin)).ciphertext
        keks = "SELECT root_key_id FROM crypto_tenant_keks WHERE tenant_id = $1"
        before = await running.app.db.fetchval(keks, TENANT)
        cli = server_env(
            DATABASE_URL=running.app.config.database.url, TRUSTPLANE_ROOT_KEY_FILE=str(key_file)
        )
        done = await run_server_async("keys", "rotate-root", "--generate", env=cli, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        total = await running.app.db.fetchval("SELECT count(*) FROM crypto_tenant_keks")
        assert f"rewrapped {total} tenant" in done.stdout  # ours and the server's own
        after = await running.app.db.fetchval(keks, TENANT)
        assert after != before
        # The running server (caches off) meets a KEK under a root key it has not loaded.
        assert (await decrypt(running, admin, sealed)).plaintext == b"secret"
        config = running.app.config
    # Drop the old root key entirely: only the new one remains, and it suffices.
    key_file.write_text(key_file.read_text().splitlines()[0] + "\n")
    async with start_server(config=config) as fresh:
        assert (await decrypt(fresh, admin, sealed)).plaintext == b"secret"


async def test_wrong_root_key_fails_closed(start_server, idp):
    async with start_server(TRUSTPLANE_ROOT_KEY=base64.b64encode(os.urandom(32)).decode()) as a:
        admin = bearer(idp.token(roles=["admin"]))
        await create(a, admin)
        config = a.app.config
    other = dataclasses.replace(
        config,
        crypto=dataclasses.replace(
            config.crypto, root_key=base64.b64encode(os.urandom(32)).decode()
        ),
    )
    # The server's own keys (token signing) are unwrapped at start-up: it refuses to start
    # rather than serve with a root key that cannot read its data.
    with pytest.raises(RootKeyUnavailable):
        async with start_server(config=other):
            pass


async def test_disable_reaches_another_process_at_once(start_server, idp):
    """Cached key metadata is dropped everywhere through the cache's pub/sub."""
    async with start_server() as first, start_server() as second:
        admin = bearer(idp.token(roles=["admin"]))
        await create(first, admin)
        old = (await encrypt(first, admin)).ciphertext
        await first.crypto.RotateKey(pb.RotateKeyRequest(name="k"), metadata=admin)
        assert (await decrypt(second, admin, old)).plaintext == b"secret"  # cached in `second`
        await first.crypto.DisableKeyVersion(
            pb.DisableKeyVersionRequest(name="k", version=1), metadata=admin
        )
        async with asyncio.timeout(5):
            while True:
                try:
                    await decrypt(second, admin, old)
                except grpc.aio.AioRpcError as error:
                    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
                    break
                await asyncio.sleep(0.02)
        assert (await encrypt(second, admin)).key_version == 2


async def test_signing_api_for_other_services(server):
    """What the Auth service uses to sign tokens: a server-owned key, verifiable with the JWKS
    alone (as a Go or Node verifier would), rotation publishing both versions."""
    keys = server.app.crypto
    key = await keys.ensure_signing_key("_system", "auth-tokens", Algorithm.ED25519)
    again = await keys.ensure_signing_key("_system", "auth-tokens", Algorithm.ED25519)
    assert key.key_id == again.key_id
    signing_input = b"header.payload"
    signature, version, kid = await keys.sign("_system", "auth-tokens", signing_input)
    jwks = await keys.jwks("_system", "auth-tokens")
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == kid]
    public = jwt.PyJWK(jwk).key
    public.verify(signature, signing_input)  # raises if invalid
    await keys.rotate("_system", "auth-tokens")
    kids = {k["kid"] for k in (await keys.jwks("_system", "auth-tokens"))["keys"]}
    assert kids == {f"{key.key_id}.1", f"{key.key_id}.2"} and version == 1


async def test_root_rotation_reaches_a_running_server_at_once(start_server, idp, tmp_path):
    """After `keys rotate-root --generate`, the server that keeps running wraps a new tenant's KEK
    under the new primary root key (no restart), still reads the old data, and keeps reading
    everything once the old root key is removed from the file."""
    key_file = tmp_path / "root.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    key_file.chmod(0o600)
    old_root = root_key_id(base64.b64decode(key_file.read_text().split()[0]))
    env = {"TRUSTPLANE_ROOT_KEY_FILE": str(key_file), "TRUSTPLANE_KEY_CACHE_TTL": "0"}
    kek_root = "SELECT root_key_id FROM crypto_tenant_keks WHERE tenant_id = $1"
    async with start_server(**env) as running:
        admin = bearer(idp.token(roles=["admin"]))
        await create(running, admin)
        sealed = (await encrypt(running, admin)).ciphertext
        assert await running.app.db.fetchval(kek_root, TENANT) == old_root
        cli = server_env(
            DATABASE_URL=running.app.config.database.url, TRUSTPLANE_ROOT_KEY_FILE=str(key_file)
        )
        done = await run_server_async("keys", "rotate-root", "--generate", env=cli, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        new_root = root_key_id(base64.b64decode(key_file.read_text().split()[0]))
        assert new_root != old_root
        # A tenant that appears now gets its KEK from the running server, under the new root.
        other = bearer(idp.token(roles=["admin"], tid=OTHER_TENANT))
        await create(running, other)
        other_sealed = (await encrypt(running, other, plaintext=b"theirs")).ciphertext
        assert await running.app.db.fetchval(kek_root, OTHER_TENANT) == new_root
        assert await running.app.db.fetchval(kek_root, TENANT) == new_root  # rewrapped
        assert (await decrypt(running, admin, sealed)).plaintext == b"secret"
        # The old root key leaves the file: the running server forgets it and reads on.
        key_file.write_text(key_file.read_text().splitlines()[0] + "\n")
        assert (await decrypt(running, admin, sealed)).plaintext == b"secret"
        assert (await decrypt(running, other, other_sealed)).plaintext == b"theirs"
        assert (await encrypt(running, other)).key_version == 1
        remaining = await running.app.db.fetchval(
            "SELECT count(*) FROM crypto_tenant_keks WHERE root_key_id <> $1", new_root
        )
        assert remaining == 0
        config = running.app.config
    async with start_server(config=config) as fresh:  # only the new root key exists now
        assert (await decrypt(fresh, admin, sealed)).plaintext == b"secret"
        assert (await decrypt(fresh, other, other_sealed)).plaintext == b"theirs"


async def _wait_for_usage(running, metadata, expected, name="k"):
    """Per-version usage as GetKey reports it, once the coalesced flush has written it."""
    async with asyncio.timeout(10):
        while True:
            key = (await running.crypto.GetKey(pb.GetKeyRequest(name=name), metadata=metadata)).key
            usage = [dict(v.usage) for v in key.versions]
            if usage == expected:
                return
            await asyncio.sleep(0.05)


async def test_usage_is_counted_per_version(start_server, idp):
    async with start_server(TRUSTPLANE_CRYPTO_SWEEP_INTERVAL="0.05") as running:
        admin = bearer(idp.token(roles=["admin"]))
        await create(running, admin)
        sealed = [(await encrypt(running, admin)).ciphertext for _ in range(5)]
        for ciphertext in sealed[:2]:
            await decrypt(running, admin, ciphertext)
        await _wait_for_usage(running, admin, [{"encrypt": 5, "decrypt": 2}])
        await running.crypto.RotateKey(pb.RotateKeyRequest(name="k"), metadata=admin)
        for _ in range(3):
            await encrypt(running, admin)
        items = [pb.EncryptItem(plaintext=b"p", associated_data=b"a")] * 4
        await running.crypto.BatchEncrypt(
            pb.BatchEncryptRequest(name="k", items=items), metadata=admin
        )
        await decrypt(running, admin, sealed[4])
        await _wait_for_usage(running, admin, [{"encrypt": 5, "decrypt": 3}, {"encrypt": 7}])


async def test_usage_counts_survive_a_failed_flush(start_server, idp):
    """The write of the coalesced counts fails (the database refuses it): nothing is lost, the
    next flush writes them with the ones gathered meanwhile."""
    async with start_server(TRUSTPLANE_CRYPTO_SWEEP_INTERVAL="3600") as running:
        admin = bearer(idp.token(roles=["admin"]))
        await create(running, admin)
        db = running.app.db.pool
        await db.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused for the test'; END $$"
        )
        await db.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON crypto_key_versions "
            "FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
        for _ in range(3):
            await encrypt(running, admin)
        with pytest.raises(asyncpg.RaiseError):
            await running.app.crypto.flush_usage()
        await db.execute("DROP TRIGGER refuse ON crypto_key_versions")
        await encrypt(running, admin)
        await running.app.crypto.flush_usage()
        await _wait_for_usage(running, admin, [{"encrypt": 4}])


async def test_batch_encrypt_reports_an_oversize_item_on_its_own(start_server, idp):
    async with start_server(TRUSTPLANE_CRYPTO_SWEEP_INTERVAL="0.05") as running:
        admin = bearer(idp.token(roles=["admin"]))
        await create(running, admin)
        items = [
            pb.EncryptItem(plaintext=b"first", associated_data=b"a"),
            pb.EncryptItem(plaintext=b"x" * (64 * 1024 + 1), associated_data=b"a"),
            pb.EncryptItem(plaintext=b"third", associated_data=b"a"),
        ]
        results = (
            await running.crypto.BatchEncrypt(
                pb.BatchEncryptRequest(name="k", items=items), metadata=admin
            )
        ).results
        error = results[1].error
        assert (error.code, error.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
            "REQUEST_TOO_LARGE",
        )
        assert not results[1].data and "64 KiB" in error.message
        for index, plaintext in ((0, b"first"), (2, b"third")):
            assert not results[index].HasField("error")
            opened = await decrypt(running, admin, results[index].data, aad=b"a")
            assert opened.plaintext == plaintext
        await _wait_for_usage(running, admin, [{"encrypt": 2, "decrypt": 2}])


async def test_store_reads_and_writes_versions_only_within_the_tenant(server, admin):
    """A key id alone never reaches another tenant's version material or usage counters."""
    from server.crypto.store import PgKeyStore

    key = await create(server, admin)
    store = PgKeyStore(server.app.db)
    assert await store.material(TENANT, key.key_id, 1) is not None
    assert await store.material(OTHER_TENANT, key.key_id, 1) is None
    await store.add_usage({(OTHER_TENANT, key.key_id, 1): {"encrypt": 5}})
    await store.add_usage({(TENANT, key.key_id, 1): {"encrypt": 2}})
    stored = await store.require(TENANT, "k")
    assert stored.versions[0].usage == {"encrypt": 2}
