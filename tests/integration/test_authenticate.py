"""The authenticate layer through the real server: every rejection reason, the verified-token
cache, key refresh on an unknown kid, revocation, API keys, public methods."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.request

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from tptest.v1 import test_service_pb2

from server.cache import RedisCache
from server.revocation import RevocationList
from tests.support.status import expect_error
from tests.support.tokens import TENANT, bearer, new_private_key

WHO = test_service_pb2.WhoAmIRequest()


async def who(server, token, **kwargs):
    return await server.test.WhoAmI(WHO, metadata=bearer(token), **kwargs)


async def test_valid_token_builds_the_actor_context(server, idp):
    token = idp.token(
        sub="user-7",
        roles=["viewer", "member"],
        scope="tptest.read tptest.write",
        sid="s-1",
        jti="t-1",
        act={"sub": "agent-2", "act": {"sub": "agent-1"}},
    )
    response = await who(server, token)
    assert response.tenant_id == TENANT and response.subject == "user-7"
    assert response.subject_type == "user" and response.auth_method == "jwt"
    assert list(response.roles) == ["member", "viewer"]
    assert response.scoped and list(response.scopes) == ["tptest.read", "tptest.write"]
    assert list(response.act) == ["agent-2", "agent-1"]
    assert (response.session_id, response.token_id) == ("s-1", "t-1")


async def test_public_method_needs_no_credentials(server):
    response = await server.test.Echo(test_service_pb2.EchoRequest(message="hi"))
    assert response.message == "hi"


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "CREDENTIALS_MISSING"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "CREDENTIALS_MALFORMED"),
        ((("authorization", "Bearer"),), "CREDENTIALS_MALFORMED"),
        ((("authorization", "Bearer not-a-jwt"),), "CREDENTIALS_MALFORMED"),
        ((("authorization", "Bearer a.b.c"),), "CREDENTIALS_MALFORMED"),
        ((("x-api-key", "tp_test_abc_def"),), "API_KEY_INVALID"),
        ((("authorization", "Bearer tp_test_abc_def"),), "API_KEY_INVALID"),
    ],
)
async def test_missing_and_malformed_credentials(server, metadata, reason):
    status = await expect_error(server.test.WhoAmI(WHO, metadata=metadata))
    assert status.code is grpc.StatusCode.UNAUTHENTICATED
    assert status.reason == reason


async def test_two_credentials_are_refused(server, idp):
    metadata = (*bearer(idp.token()), ("x-api-key", "tp_test_a_b"))
    status = await expect_error(server.test.WhoAmI(WHO, metadata=metadata))
    assert status.reason == "CREDENTIALS_MALFORMED"


def _rejections(idp):
    now = int(time.time())
    return {
        "expired": (idp.token(exp=now - 120, iat=now - 400), "TOKEN_EXPIRED"),
        "nbf in the future": (idp.token(nbf=now + 300), "TOKEN_NOT_YET_VALID"),
        "iat in the future": (idp.token(iat=now + 300, exp=now + 600), "TOKEN_NOT_YET_VALID"),
        "wrong audience": (idp.token(aud="someone-else"), "TOKEN_AUDIENCE_INVALID"),
        "untrusted issuer": (idp.token(iss="https://evil.test"), "TOKEN_ISSUER_INVALID"),
        "no sub": (idp.token(sub=None), "CREDENTIALS_MALFORMED"),
        "no exp": (idp.token(exp=None), "CREDENTIALS_MALFORMED"),
        "no tenant": (idp.token(tid=None), "CREDENTIALS_MALFORMED"),
        "bad act": (idp.token(act={"nobody": 1}), "CREDENTIALS_MALFORMED"),
        "untrusted key, same kid": (
            idp.token(key=new_private_key("EdDSA")),
            "TOKEN_SIGNATURE_INVALID",
        ),
        "unknown kid": (
            idp.token(kid="nope", key=new_private_key("EdDSA")),
            "TOKEN_SIGNATURE_INVALID",
        ),
        "alg none": (_alg_none(idp.claims()), "TOKEN_SIGNATURE_INVALID"),
        "HS256 with the public key": (_hs256_with_public_key(idp), "TOKEN_SIGNATURE_INVALID"),
        "tampered payload": (_tampered(idp), "TOKEN_SIGNATURE_INVALID"),
    }


async def test_every_rejection_reason(server, idp):
    for case, (token, reason) in _rejections(idp).items():
        status = await expect_error(who(server, token))
        assert (status.code, status.reason) == (grpc.StatusCode.UNAUTHENTICATED, reason), case
        assert token not in status.message, case


def _alg_none(claims):
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": "key-1"}).encode())
    body = base64.urlsafe_b64encode(json.dumps(claims).encode())
    return f"{header.decode().rstrip('=')}.{body.decode().rstrip('=')}."


def _hs256_with_public_key(idp):
    private, _ = idp.keys["key-1"]
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": "key-1"}).encode())
    body = base64.urlsafe_b64encode(json.dumps(idp.claims()).encode())
    signing_input = f"{header.decode().rstrip('=')}.{body.decode().rstrip('=')}"
    import hashlib
    import hmac

    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).decode().rstrip('=')}"


def _tampered(idp):
    header, _, signature = idp.token().split(".")
    forged = idp.claims(roles=["owner"])
    body = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
    return f"{header}.{body}.{signature}"


async def test_leeway_accepts_slightly_expired_token(server, idp):
    now = int(time.time())
    response = await who(server, idp.token(exp=now - 5, iat=now - 300))
    assert response.subject == "user-1"


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
async def test_other_allowed_algorithms(server, idp, algorithm):
    idp.add_key(f"k-{algorithm}", algorithm)  # unknown kid at first: one refresh loads it
    response = await who(server, idp.token(kid=f"k-{algorithm}"))
    assert response.subject == "user-1"


async def test_unknown_kid_refreshes_the_key_source_once(server, idp):
    idp.add_key("key-2", "EdDSA")  # rotated in after start-up
    assert (await who(server, idp.token(kid="key-2"))).subject == "user-1"
    idp.add_key("key-3", "EdDSA")
    # A second unknown kid within the refresh interval is refused without another refresh.
    status = await expect_error(who(server, idp.token(kid="key-3")))
    assert status.reason == "TOKEN_SIGNATURE_INVALID"
    await asyncio.sleep(1.1)
    assert (await who(server, idp.token(kid="key-3"))).subject == "user-1"


def _token_cache(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("trustplane_token_cache{")
    }


async def test_verified_token_is_cached(server, idp):
    token = idp.token()
    await who(server, token)
    before = await asyncio.to_thread(_token_cache, server.app.metrics_port)
    for _ in range(5):
        await who(server, token)
    after = await asyncio.to_thread(_token_cache, server.app.metrics_port)
    assert after["hits"] - before["hits"] == 5
    assert after["misses"] == before["misses"]


async def test_cached_token_still_expires(start_server, idp):
    async with start_server(TRUSTPLANE_JWT_LEEWAY="0") as running:
        now = time.time()
        token = idp.token(exp=int(now) + 2, iat=int(now))
        await who(running, token)
        await asyncio.sleep(max(0.0, int(now) + 2 - time.time()) + 0.1)
        status = await expect_error(who(running, token))
        assert status.reason == "TOKEN_EXPIRED"


@pytest.mark.parametrize("target", ["token", "session", "subject"])
async def test_revocation_from_another_process_applies_at_once(
    start_server, idp, redis_url, redis_prefix, target
):
    # A long staleness bound: only the pub/sub notice can make this immediate.
    async with start_server(TRUSTPLANE_REVOCATION_STALENESS="30") as running:
        token = idp.token(jti="jti-1", sid="sid-1", iat=int(time.time()) - 10)
        await who(running, token)
        other = RedisCache(redis_url, redis_prefix)  # what another server process would do
        try:
            revocations = RevocationList(other, staleness=30, max_token_ttl=3600)
            if target == "token":
                await revocations.revoke_token("jti-1")
            elif target == "session":
                await revocations.revoke_session("sid-1")
            else:
                await revocations.revoke_subject(TENANT, "user-1")
        finally:
            await other.close()
        async with asyncio.timeout(5):
            while True:
                try:
                    await who(running, token)
                except grpc.aio.AioRpcError as error:
                    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
                    break
                await asyncio.sleep(0.02)
        status = await expect_error(who(running, token))
        assert status.reason == "TOKEN_REVOKED"
        # Revoking a subject spares tokens issued after the revocation.
        if target == "subject":
            await asyncio.sleep(1.1)
            fresh = idp.token(iat=int(time.time()) + 1, jti="jti-2", sid="sid-2")
            assert (await who(running, fresh)).subject == "user-1"


async def test_revocation_check_fails_closed_when_cache_is_down(start_server, idp):
    async with start_server(
        REDIS_URL="redis://127.0.0.1:1/0", TRUSTPLANE_REVOCATION_STALENESS="0"
    ) as running:
        status = await expect_error(who(running, idp.token()))
        assert status.code is grpc.StatusCode.UNAVAILABLE
        assert status.reason == "UNAVAILABLE"


def test_jwt_library_refuses_none_when_asked_directly(idp):
    """Guard against a library default changing under us."""
    with pytest.raises(jwt.InvalidTokenError):
        jwt.decode(
            _alg_none(idp.claims()),
            options={"verify_signature": True},
            algorithms=["EdDSA"],
            audience="trustplane",
        )
