"""One-time secrets and the idempotency cache, through the real server with both cache backends.

A response with a field marked `(trustplane.common.v1.secret)` is never kept for replay: the
cache holds only "this succeeded" (FAILED_PRECONDITION / SECRET_ALREADY_SHOWN), a retry gets that
instead of the secret, and when the cache has lost even that, the resource's own request id in
PostgreSQL gives the same answer. Nothing is created twice.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pyotp
import pytest
import redis.asyncio
from google.protobuf import timestamp_pb2
from trustplane.auth.v1 import auth_pb2 as pb

from interceptors.idempotency import Record, scope_key
from server.actor import ActorContext, AuthMethod, PrincipalType
from server.methods import spec_from_descriptor
from tests.support.status import expect_error, rich
from tests.support.tokens import bearer

EMAIL = "owner@acme.test"
_AUTH = pb.DESCRIPTOR.services_by_name["AuthService"]


@pytest.fixture(params=["redis", "memory"])
def backend(request):
    return request.param


@pytest.fixture
async def running(start_server, backend):
    async with start_server(**({"REDIS_URL": ""} if backend == "memory" else {})) as server:
        yield server


@pytest.fixture
async def owner(running):
    _, owner, password = await running.app.auth.bootstrap("acme", EMAIL)
    login = await running.auth.Login(pb.LoginRequest(tenant="acme", email=EMAIL, password=password))
    return owner, bearer(login.tokens.access_token)


def _later(seconds):
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int((time.time() + seconds) * 1e9))
    return stamp


def _scope(owner, method, request_id):
    actor = ActorContext(owner.tenant_id, owner.id, PrincipalType.USER, AuthMethod.JWT)
    return scope_key(actor, spec_from_descriptor(_AUTH.methods_by_name[method]), request_id)


async def _replayed(call) -> bool:
    return dict(await call.initial_metadata() or ()).get("idempotency-replayed") == "true"


async def _retry_is_refused(call) -> bool:
    """The retry fails SECRET_ALREADY_SHOWN; True if that answer was a replay from the cache."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        status = rich(error)
        assert (status.code, status.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "SECRET_ALREADY_SHOWN",
        )
        return await _replayed(call)
    raise AssertionError("a retry was answered with the secret again")


async def _cache_holds_no_secret(running, redis_url, redis_prefix, owner, method, key, secret):
    """The replay record holds the refusal, not the response; and (Redis) no value anywhere
    under this server's prefix contains the secret."""
    raw = await running.app.cache.get(_scope(owner, method, key))
    assert raw is not None
    record = Record.decode(raw)
    assert record.done and record.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert secret.encode() not in record.body and secret.encode() not in raw
    if running.app.config.cache.url:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            async for name in client.scan_iter(match=f"{redis_prefix}*"):
                if await client.type(name) == b"string":
                    value = await client.get(name) or b""
                    assert secret.encode() not in value
                    assert secret.encode() not in _record_body(value)
        finally:
            await client.aclose()


def _record_body(value: bytes) -> bytes:
    """The base64-decoded body if `value` is an idempotency record, else nothing."""
    try:
        return Record.decode(value).body
    except (ValueError, KeyError, TypeError):
        return b""


async def _check_not_shown_twice(running, redis_url, redis_prefix, owner, method, send, secret_of):
    """Call once, retry from the cache, drop the cache record, retry again (PostgreSQL path)."""
    user, _ = owner
    request_id = str(uuid.uuid4())
    first = await send(request_id)
    secret = secret_of(first)
    assert secret
    assert await _retry_is_refused(send(request_id))  # from the cache: a replay
    await _cache_holds_no_secret(running, redis_url, redis_prefix, user, method, request_id, secret)
    assert await running.app.cache.delete(_scope(user, method, request_id))
    # The cache lost the record (Redis flushed, a crash before the write): PostgreSQL's unique
    # request id refuses to create or show anything again.
    assert not await _retry_is_refused(send(request_id))
    return first


async def test_create_api_key_secret_is_never_replayed(running, owner, redis_url, redis_prefix):
    _, me = owner
    expiry = _later(3600)  # the retry must be the same request

    def send(request_id):
        request = pb.CreateApiKeyRequest(
            request_id=request_id, expire_time=expiry, display_name="ci"
        )
        return running.auth.CreateApiKey(request, metadata=me)

    first = await _check_not_shown_twice(
        running, redis_url, redis_prefix, owner, "CreateApiKey", send, lambda r: r.api_key
    )
    listed = await running.auth.ListApiKeys(pb.ListApiKeysRequest(), metadata=me)
    assert [k.key_id for k in listed.api_keys] == [first.metadata.key_id]  # no duplicate
    who = await running.auth.WhoAmI(pb.WhoAmIRequest(), metadata=(("x-api-key", first.api_key),))
    assert who.auth_method == "api_key"


async def test_rotate_api_key_secret_is_never_replayed(running, owner, redis_url, redis_prefix):
    _, me = owner
    old = await running.auth.CreateApiKey(
        pb.CreateApiKeyRequest(request_id=str(uuid.uuid4()), expire_time=_later(3600)),
        metadata=me,
    )

    def send(request_id):
        request = pb.RotateApiKeyRequest(
            request_id=request_id, key_id=old.metadata.key_id, overlap_seconds=600
        )
        return running.auth.RotateApiKey(request, metadata=me)

    rotated = await _check_not_shown_twice(
        running, redis_url, redis_prefix, owner, "RotateApiKey", send, lambda r: r.api_key
    )
    listed = await running.auth.ListApiKeys(pb.ListApiKeysRequest(), metadata=me)
    assert {k.key_id for k in listed.api_keys} == {old.metadata.key_id, rotated.metadata.key_id}


async def test_invitation_token_is_never_replayed(running, owner, redis_url, redis_prefix):
    user, me = owner

    def send(request_id):
        request = pb.CreateInvitationRequest(
            request_id=request_id, email="new@acme.test", role="member"
        )
        return running.auth.CreateInvitation(request, metadata=me)

    first = await _check_not_shown_twice(
        running, redis_url, redis_prefix, owner, "CreateInvitation", send, lambda r: r.token
    )
    count = await running.app.db.fetchval(
        "SELECT count(*) FROM invitations WHERE tenant_id = $1", user.tenant_id
    )
    assert count == 1
    accepted = await running.auth.AcceptInvitation(
        pb.AcceptInvitationRequest(token=first.token, password="a-long-enough-password")
    )
    assert accepted.tenant == "acme"


async def test_concurrent_retries_see_the_secret_once(running, owner):
    _, me = owner
    request = pb.CreateApiKeyRequest(request_id=str(uuid.uuid4()), expire_time=_later(3600))
    outcomes = await asyncio.gather(
        *(running.auth.CreateApiKey(request, metadata=me) for _ in range(6)),
        return_exceptions=True,
    )
    keys = [o for o in outcomes if isinstance(o, pb.CreateApiKeyResponse)]
    refused = [rich(o) for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(keys) == 1 and len(refused) == 5
    assert {s.reason for s in refused} == {"SECRET_ALREADY_SHOWN"}
    listed = await running.auth.ListApiKeys(pb.ListApiKeysRequest(), metadata=me)
    assert len(listed.api_keys) == 1


async def test_a_different_request_with_the_same_id_is_still_refused(running, owner):
    _, me = owner
    request_id = str(uuid.uuid4())
    await running.auth.CreateApiKey(
        pb.CreateApiKeyRequest(request_id=request_id, expire_time=_later(3600)), metadata=me
    )
    status = await expect_error(
        running.auth.CreateApiKey(
            pb.CreateApiKeyRequest(request_id=request_id, expire_time=_later(7200)), metadata=me
        )
    )
    assert status.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_mfa_enrolment_and_recovery_codes_are_never_replayed(
    running, owner, redis_url, redis_prefix
):
    user, me = owner
    enrol_id = str(uuid.uuid4())
    enrolled = await running.auth.EnrollMfa(pb.EnrollMfaRequest(request_id=enrol_id), metadata=me)
    retry = running.auth.EnrollMfa(pb.EnrollMfaRequest(request_id=enrol_id), metadata=me)
    assert await _retry_is_refused(retry)
    await _cache_holds_no_secret(
        running, redis_url, redis_prefix, user, "EnrollMfa", enrol_id, enrolled.secret
    )
    # The retry did not enrol again: the secret the first call showed is still the pending one.
    confirm = pb.ConfirmMfaRequest(
        request_id=str(uuid.uuid4()), code=pyotp.TOTP(enrolled.secret).now()
    )
    codes = list((await running.auth.ConfirmMfa(confirm, metadata=me)).recovery_codes)
    assert len(codes) == 10
    assert await _retry_is_refused(running.auth.ConfirmMfa(confirm, metadata=me))
    for code in codes:
        await _cache_holds_no_secret(
            running, redis_url, redis_prefix, user, "ConfirmMfa", confirm.request_id, code
        )
    # Disabling carries no secret: its retry replays the success instead of "not enabled".
    disable = pb.DisableMfaRequest(request_id=str(uuid.uuid4()), code=codes[0])
    await running.auth.DisableMfa(disable, metadata=me)
    again = running.auth.DisableMfa(disable, metadata=me)
    assert await again == pb.DisableMfaResponse() and await _replayed(again)
