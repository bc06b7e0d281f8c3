"""AuthService through the real server: login, tokens the chain accepts, refresh rotation and
reuse detection, sessions, JWKS verification offline, brute-force throttling."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import grpc
import jwt
import pyotp
import pytest
from google.protobuf import field_mask_pb2
from trustplane.auth.v1 import auth_pb2 as pb
from trustplane.common.v1 import actor_pb2

from tests.support.process import run_server_async, server_env
from tests.support.status import expect_error
from tests.support.tokens import bearer

EMAIL = "owner@acme.test"


@pytest.fixture
async def tenant(server):
    """A tenant `acme` and its owner, created as `python -m server bootstrap` would."""
    _tenant_id, owner, password = await server.app.auth.bootstrap("acme", EMAIL)
    return owner, password


async def login(server, password, email=EMAIL, tenant="acme"):
    return await server.auth.Login(pb.LoginRequest(tenant=tenant, email=email, password=password))


async def test_login_token_works_through_the_chain(server, tenant):
    owner, password = tenant
    response = await login(server, password)
    assert response.actor.subject_id == owner.id and list(response.roles) == ["owner"]
    tokens = response.tokens
    assert tokens.access_token.count(".") == 2 and tokens.refresh_token.startswith("tprt_")
    me = await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(tokens.access_token))
    assert me.actor.subject_id == owner.id and me.session_id == tokens.session_id
    assert me.auth_method == "jwt" and list(me.roles) == ["owner"]


async def test_tokens_verify_offline_with_only_the_jwks(server, tenant):
    """The way a Go or Node service would: fetch the JWKS once, verify locally."""
    _, password = tenant
    token = (await login(server, password)).tokens.access_token
    jwks = json.loads((await server.auth.GetJwks(pb.GetJwksRequest())).jwks)
    kid = jwt.get_unverified_header(token)["kid"]
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == kid]
    claims = jwt.decode(
        token, jwt.PyJWK(jwk).key, algorithms=["EdDSA"], audience="trustplane", issuer="trustplane"
    )
    assert claims["sub"] and claims["sid"] and claims["ptype"] == "user"
    assert claims["exp"] - claims["iat"] == 900


async def test_no_enumeration(server, tenant):
    _, password = tenant
    cases = [
        ("acme", EMAIL, "wrong"),
        ("acme", "nobody@acme.test", password),
        ("no-such-tenant", EMAIL, password),
    ]
    for tenant_name, email, secret in cases:
        status = await expect_error(login(server, secret, email=email, tenant=tenant_name))
        assert (status.code, status.reason, status.message) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "LOGIN_FAILED",
            "login failed: unknown tenant or email, or wrong password",
        )


async def test_missing_fields_are_invalid(server):
    status = await expect_error(server.auth.Login(pb.LoginRequest(tenant="acme")))
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in status.field_violations} == {"email", "password"}


async def test_refresh_rotates_and_reuse_revokes_the_family(server, tenant):
    _, password = tenant
    first = (await login(server, password)).tokens
    second = (
        await server.auth.Refresh(pb.RefreshRequest(refresh_token=first.refresh_token))
    ).tokens
    assert second.session_id == first.session_id
    assert second.refresh_token != first.refresh_token
    await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(second.access_token))
    reused = await expect_error(
        server.auth.Refresh(pb.RefreshRequest(refresh_token=first.refresh_token))
    )
    assert (reused.code, reused.reason) == (grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_REUSED")
    # The whole family is dead: the newer refresh token and every access token of the session.
    status = await expect_error(
        server.auth.Refresh(pb.RefreshRequest(refresh_token=second.refresh_token))
    )
    assert status.reason == "REFRESH_TOKEN_INVALID"
    for token in (first.access_token, second.access_token):
        status = await expect_error(server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(token)))
        assert status.reason == "TOKEN_REVOKED"
    garbage = await expect_error(server.auth.Refresh(pb.RefreshRequest(refresh_token="tprt_x")))
    assert garbage.reason == "REFRESH_TOKEN_INVALID"


async def test_sessions_list_and_revoke(server, tenant):
    _, password = tenant
    one = (await login(server, password)).tokens
    two = (await login(server, password)).tokens
    listed = await server.auth.ListSessions(
        pb.ListSessionsRequest(), metadata=bearer(one.access_token)
    )
    assert {s.session_id for s in listed.sessions} == {one.session_id, two.session_id}
    assert [s.current for s in listed.sessions if s.session_id == one.session_id] == [True]
    await server.auth.RevokeSession(
        pb.RevokeSessionRequest(session_id=two.session_id), metadata=bearer(one.access_token)
    )
    status = await expect_error(
        server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(two.access_token))
    )
    assert status.reason == "TOKEN_REVOKED"
    status = await expect_error(
        server.auth.RevokeSession(
            pb.RevokeSessionRequest(session_id="not-a-session"), metadata=bearer(one.access_token)
        )
    )
    assert status.code is grpc.StatusCode.NOT_FOUND
    done = await server.auth.RevokeAllSessions(
        pb.RevokeAllSessionsRequest(), metadata=bearer(one.access_token)
    )
    assert done.revoked == 1
    status = await expect_error(
        server.auth.Refresh(pb.RefreshRequest(refresh_token=one.refresh_token))
    )
    assert status.reason == "REFRESH_TOKEN_INVALID"


async def test_sessions_are_per_principal_and_tenant(server, tenant, idp):
    _, password = tenant
    mine = (await login(server, password)).tokens
    stranger = bearer(idp.token(roles=["owner"]))  # another tenant's owner
    status = await expect_error(
        server.auth.RevokeSession(
            pb.RevokeSessionRequest(session_id=mine.session_id), metadata=stranger
        )
    )
    assert status.code is grpc.StatusCode.NOT_FOUND
    listed = await server.auth.ListSessions(pb.ListSessionsRequest(), metadata=stranger)
    assert list(listed.sessions) == []


async def test_concurrent_wrong_guesses_cannot_exceed_the_limit(start_server):
    env = {"TRUSTPLANE_LOGIN_MAX_ATTEMPTS": "3", "TRUSTPLANE_LOGIN_WINDOW": "3"}
    async with start_server(**env) as running:
        _, _, password = await running.app.auth.bootstrap("acme", EMAIL)
        guesses = await asyncio.gather(
            *(expect_error(login(running, f"guess-{i}")) for i in range(10))
        )
        reasons = sorted(g.reason for g in guesses)
        assert reasons.count("LOGIN_FAILED") == 3 and reasons.count("LOGIN_THROTTLED") == 7
        throttled = next(g for g in guesses if g.reason == "LOGIN_THROTTLED")
        assert throttled.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert throttled.retry_delay is not None and 0 < throttled.retry_delay <= 3.0
        # Even the right password waits out the window — then works (no permanent lock).
        status = await expect_error(login(running, password))
        assert status.reason == "LOGIN_THROTTLED" and status.retry_delay is not None
        await asyncio.sleep(status.retry_delay + 0.1)
        assert (await login(running, password)).tokens.access_token


async def test_bootstrap_command_then_login(start_server, database_url, tmp_path):
    # The same data directory (and so root key) as the server started below.
    env = server_env(DATABASE_URL=database_url, TRUSTPLANE_DATA_DIR=str(tmp_path / "data"))
    done = await run_server_async(
        "bootstrap", "--tenant", "acme", "--email", EMAIL, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    password = re.search(r"password \(shown once\): (\S+)", done.stdout).group(1)
    assert password not in done.stderr  # never in the logs
    again = await run_server_async(
        "bootstrap", "--tenant", "acme", "--email", EMAIL, env=env, cwd=tmp_path
    )
    assert again.returncode == 1 and "already exists" in again.stderr
    key = re.search(r"API key \(shown once, 89 days\): (\S+)", done.stdout).group(1)
    assert key not in done.stderr
    async with start_server() as running:
        assert (await login(running, password)).tokens.access_token
        who = await running.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(key))
        assert who.auth_method == "api_key" and list(who.roles) == ["owner"]


async def test_a_viewer_manages_its_own_sessions(server, tenant):
    """Self-service needs no admin role: `auth.self.*` belongs to every role."""
    owner, _ = tenant
    hashed = await asyncio.to_thread(server.app.auth._hasher.hash, "viewer-password-1")
    viewer = await _store(server).create_user(
        owner.tenant_id, "v@acme.test", hashed, ["viewer"], "V"
    )
    tokens = (await login(server, "viewer-password-1", email="v@acme.test")).tokens
    metadata = bearer(tokens.access_token)
    listed = await server.auth.ListSessions(pb.ListSessionsRequest(), metadata=metadata)
    assert [s.session_id for s in listed.sessions] == [tokens.session_id]
    assert (
        await server.auth.RevokeAllSessions(pb.RevokeAllSessionsRequest(), metadata=metadata)
    ).revoked == 1
    assert viewer.roles == ("viewer",)


def _store(server):
    from server.auth.store import PgAuthStore

    return PgAuthStore(server.app.db)


def _later(seconds):
    from google.protobuf import timestamp_pb2

    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int((time.time() + seconds) * 1e9))
    return stamp


async def _owner_token(server, password):
    return bearer((await login(server, password)).tokens.access_token)


def _api(key):
    return (("x-api-key", key),)


async def test_api_key_shown_once_stored_as_mac_and_usable(server, tenant):
    owner, password = tenant
    me = await _owner_token(server, password)
    created = await server.auth.CreateApiKey(
        pb.CreateApiKeyRequest(
            request_id=str(uuid.uuid4()),
            scopes=["auth.whoami"],
            expire_time=_later(3600),
            display_name="ci",
        ),
        metadata=me,
    )
    key = created.api_key
    assert re.fullmatch(r"tp_live_[0-9a-f]{16}_[0-9A-Za-z]{38}", key)
    who = await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(key))
    assert (who.actor.subject_id, who.auth_method, list(who.scopes)) == (
        owner.id,
        "api_key",
        ["auth.whoami"],
    )
    also = await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(key))
    assert also.actor.subject_id == owner.id
    # Scopes narrow the owner's roles: listing sessions is outside `auth.whoami`.
    status = await expect_error(
        server.auth.ListSessions(pb.ListSessionsRequest(), metadata=_api(key))
    )
    assert status.reason == "PERMISSION_DENIED"
    rows = await server.app.db.pool.fetch("SELECT * FROM api_keys")
    secret = key.split("_")[3][:32]
    assert rows and all(secret.encode() not in bytes(str(dict(r)), "utf8") for r in rows)
    assert all(secret not in str(v) for r in rows for v in r.values())
    listed = await server.auth.ListApiKeys(pb.ListApiKeysRequest(), metadata=me)
    assert [k.key_id for k in listed.api_keys] == [created.metadata.key_id]
    assert key not in str(listed)


async def test_api_key_typo_revocation_and_validation(server, tenant):
    _, password = tenant
    me = await _owner_token(server, password)
    key = (
        await server.auth.CreateApiKey(
            pb.CreateApiKeyRequest(request_id=str(uuid.uuid4()), expire_time=_later(3600)),
            metadata=me,
        )
    ).api_key
    typo = key[:-8] + ("A" if key[-8] != "A" else "B") + key[-7:]
    status = await expect_error(server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(typo)))
    assert status.reason == "API_KEY_INVALID"
    forged = key[:-6] + "zzzzzz"
    status = await expect_error(server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(forged)))
    assert status.reason == "API_KEY_INVALID"
    await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(key))  # cached as valid now
    key_id = key.split("_")[2]
    await server.auth.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=key_id), metadata=me)
    status = await expect_error(server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(key)))
    assert status.code is grpc.StatusCode.UNAUTHENTICATED
    for bad in ({"expire_time": _later(-10)}, {"expire_time": _later(91 * 86400)}, {}):
        status = await expect_error(
            server.auth.CreateApiKey(
                pb.CreateApiKeyRequest(request_id=str(uuid.uuid4()), **bad), metadata=me
            )
        )
        assert status.field_violations[0][0] == "expire_time"


async def test_api_key_expires(start_server, idp):
    now = [time.time()]
    async with start_server(clock=lambda: now[0]) as running:
        _, _, password = await running.app.auth.bootstrap("acme", EMAIL)
        me = await _owner_token(running, password)
        expiry = now[0] + 86400  # by the server's clock, so a slow login cannot shift it
        key = (
            await running.auth.CreateApiKey(
                pb.CreateApiKeyRequest(request_id=str(uuid.uuid4()), expire_time=_stamp(expiry)),
                metadata=me,
            )
        ).api_key
        assert (await running.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(key))).actor
        now[0] = expiry + 1
        status = await expect_error(running.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(key)))
        assert status.reason == "API_KEY_INVALID"


async def test_agents_inventory_keys_and_kill_switch(server, tenant, idp):
    owner, password = tenant
    me = await _owner_token(server, password)
    created = (
        await server.auth.CreateAgent(
            pb.CreateAgentRequest(
                request_id=str(uuid.uuid4()),
                display_name="researcher",
                purpose="web research",
                roles=["viewer"],
            ),
            metadata=me,
        )
    ).agent
    assert (created.owner_id, list(created.roles), created.disabled) == (
        owner.id,
        ["viewer"],
        False,
    )
    fetched = (
        await server.auth.GetAgent(pb.GetAgentRequest(agent_id=created.agent_id), metadata=me)
    ).agent
    assert fetched.purpose == "web research"
    for i in range(2):
        await server.auth.CreateAgent(
            pb.CreateAgentRequest(request_id=str(uuid.uuid4()), display_name=f"a{i}", roles=[]),
            metadata=me,
        )
    page = await server.auth.ListAgents(pb.ListAgentsRequest(page_size=2), metadata=me)
    rest = await server.auth.ListAgents(
        pb.ListAgentsRequest(page_size=2, page_token=page.next_page_token), metadata=me
    )
    assert len(page.agents) == 2 and len(rest.agents) == 1 and not rest.next_page_token
    too_wide = await expect_error(
        server.auth.CreateApiKey(
            pb.CreateApiKeyRequest(
                request_id=str(uuid.uuid4()),
                principal_id=created.agent_id,
                scopes=["crypto.keys.create"],
                expire_time=_later(3600),
            ),
            metadata=me,
        )
    )
    assert (too_wide.code, too_wide.field_violations[0][0]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "scopes",
    )
    agent_key = (
        await server.auth.CreateApiKey(
            pb.CreateApiKeyRequest(
                request_id=str(uuid.uuid4()),
                principal_id=created.agent_id,
                expire_time=_later(3600),
            ),
            metadata=me,
        )
    ).api_key
    who = await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(agent_key))
    assert who.actor.subject_id == created.agent_id
    assert who.actor.subject_type == 2  # PRINCIPAL_TYPE_AGENT
    killed = (
        await server.auth.SetAgentDisabled(
            pb.SetAgentDisabledRequest(agent_id=created.agent_id, disabled=True), metadata=me
        )
    ).agent
    assert killed.disabled
    status = await expect_error(server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(agent_key)))
    assert status.code is grpc.StatusCode.UNAUTHENTICATED
    await server.auth.SetAgentDisabled(
        pb.SetAgentDisabledRequest(agent_id=created.agent_id, disabled=False), metadata=me
    )
    status = await expect_error(server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(agent_key)))
    assert status.code is grpc.StatusCode.UNAUTHENTICATED  # killed keys stay dead
    other_tenant = bearer(idp.token(roles=["owner"]))
    status = await expect_error(
        server.auth.GetAgent(pb.GetAgentRequest(agent_id=created.agent_id), metadata=other_tenant)
    )
    assert status.code is grpc.StatusCode.NOT_FOUND


async def test_agent_roles_cannot_exceed_the_owners(server, tenant):
    owner, _ = tenant
    hashed = await asyncio.to_thread(server.app.auth._hasher.hash, "member-password-1")
    await _store(server).create_user(owner.tenant_id, "m@acme.test", hashed, ["member"], "M")
    member = bearer(
        (await login(server, "member-password-1", email="m@acme.test")).tokens.access_token
    )
    status = await expect_error(
        server.auth.CreateAgent(
            pb.CreateAgentRequest(request_id=str(uuid.uuid4()), display_name="x", roles=["admin"]),
            metadata=member,
        )
    )
    assert (status.code, status.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    ok = await server.auth.CreateAgent(
        pb.CreateAgentRequest(request_id=str(uuid.uuid4()), display_name="x", roles=["member"]),
        metadata=member,
    )
    assert list(ok.agent.roles) == ["member"]


async def _agent_with_key(server, me, roles, scopes=()):
    agent = (
        await server.auth.CreateAgent(
            pb.CreateAgentRequest(request_id=str(uuid.uuid4()), display_name="helper", roles=roles),
            metadata=me,
        )
    ).agent
    key = (
        await server.auth.CreateApiKey(
            pb.CreateApiKeyRequest(
                request_id=str(uuid.uuid4()),
                principal_id=agent.agent_id,
                scopes=list(scopes),
                expire_time=_later(3600),
            ),
            metadata=me,
        )
    ).api_key
    return agent, key


async def test_delegation_intersects_scopes_and_dies_with_the_session(server, tenant):
    owner, password = tenant
    tokens = (await login(server, password)).tokens
    me = bearer(tokens.access_token)
    agent, agent_key = await _agent_with_key(
        server, me, ["member"], scopes=["auth.whoami", "auth.tokens.read"]
    )
    exchanged = await server.auth.ExchangeToken(
        pb.ExchangeTokenRequest(
            subject_token=tokens.access_token,
            actor_token=agent_key,
            scopes=["auth.whoami", "auth.tokens.read", "crypto.keys.rotate"],
        )
    )
    # crypto.keys.rotate: the user (owner) may, the agent (a scoped member) may not.
    assert list(exchanged.scopes) == ["auth.whoami", "auth.tokens.read"]
    delegated = bearer(exchanged.access_token)
    who = await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=delegated)
    assert who.actor.subject_id == owner.id and who.actor.act.subject_id == agent.agent_id
    assert who.session_id == tokens.session_id and sorted(who.scopes) == [
        "auth.tokens.read",
        "auth.whoami",
    ]
    claims = jwt.decode(exchanged.access_token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 300 and "refresh" not in json.dumps(claims)
    introspected = await server.auth.IntrospectToken(
        pb.IntrospectTokenRequest(token=exchanged.access_token), metadata=me
    )
    assert introspected.active and introspected.actor.act.subject_id == agent.agent_id
    denied = await expect_error(
        server.auth.ListSessions(pb.ListSessionsRequest(), metadata=delegated)
    )
    assert denied.reason == "PERMISSION_DENIED"  # outside the delegated scopes
    await server.auth.RevokeAllSessions(pb.RevokeAllSessionsRequest(), metadata=me)
    status = await expect_error(server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=delegated))
    assert status.reason == "TOKEN_REVOKED"


async def test_delegation_audience_depth_and_validation(start_server):
    async with start_server(TRUSTPLANE_DELEGATION_MAX_DEPTH="2") as server:
        _, _, password = await server.app.auth.bootstrap("acme", EMAIL)
        user_token = (await login(server, password)).tokens.access_token
        me = bearer(user_token)
        _, first_key = await _agent_with_key(server, me, ["member"])
        _, second_key = await _agent_with_key(server, me, ["member"])
        _, third_key = await _agent_with_key(server, me, ["member"])
        elsewhere = await server.auth.ExchangeToken(
            pb.ExchangeTokenRequest(
                subject_token=user_token,
                actor_token=first_key,
                scopes=["auth.whoami"],
                audience="https://tools.example",
            )
        )
        status = await expect_error(
            server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(elsewhere.access_token))
        )
        assert status.reason == "TOKEN_AUDIENCE_INVALID"  # bound to another audience
        one = (
            await server.auth.ExchangeToken(
                pb.ExchangeTokenRequest(
                    subject_token=user_token, actor_token=first_key, scopes=["auth.whoami"]
                )
            )
        ).access_token
        two = (
            await server.auth.ExchangeToken(
                pb.ExchangeTokenRequest(
                    subject_token=one, actor_token=second_key, scopes=["auth.whoami"]
                )
            )
        ).access_token
        who = await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(two))
        assert who.actor.act.act.subject_id  # sub-agent outermost, first agent nested
        status = await expect_error(
            server.auth.ExchangeToken(
                pb.ExchangeTokenRequest(
                    subject_token=two, actor_token=third_key, scopes=["auth.whoami"]
                )
            )
        )
        assert (status.code, status.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "DELEGATION_TOO_DEEP",
        )
        status = await expect_error(
            server.auth.ExchangeToken(
                pb.ExchangeTokenRequest(
                    subject_token=first_key, actor_token=second_key, scopes=["auth.whoami"]
                )
            )
        )
        assert status.field_violations[0][0] == "subject_token"
        status = await expect_error(
            server.auth.ExchangeToken(
                pb.ExchangeTokenRequest(
                    subject_token=user_token,
                    actor_token="tp_live_nope_nope",
                    scopes=["auth.whoami"],
                )
            )
        )
        assert status.reason == "API_KEY_INVALID"


async def test_introspect_and_revoke_token(server, tenant, idp):
    _, password = tenant
    first = (await login(server, password)).tokens.access_token
    second = (await login(server, password)).tokens.access_token
    me = bearer(first)
    assert (
        await server.auth.IntrospectToken(pb.IntrospectTokenRequest(token=second), metadata=me)
    ).active
    garbage = await server.auth.IntrospectToken(
        pb.IntrospectTokenRequest(token="x.y.z"), metadata=me
    )
    assert not garbage.active
    foreign = await server.auth.IntrospectToken(
        pb.IntrospectTokenRequest(token=second), metadata=bearer(idp.token(roles=["owner"]))
    )
    assert not foreign.active  # another tenant's caller learns nothing
    await server.auth.RevokeToken(pb.RevokeTokenRequest(token=second), metadata=me)
    assert not (
        await server.auth.IntrospectToken(pb.IntrospectTokenRequest(token=second), metadata=me)
    ).active
    status = await expect_error(server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(second)))
    assert status.reason == "TOKEN_REVOKED"
    await server.auth.RevokeToken(pb.RevokeTokenRequest(token="not-a-token"), metadata=me)


async def test_mfa_enrol_login_with_code_and_recovery_codes(server, tenant):
    _, password = tenant
    me = await _owner_token(server, password)
    enrolled = await server.auth.EnrollMfa(pb.EnrollMfaRequest(), metadata=me)
    assert enrolled.otpauth_uri.startswith("otpauth://totp/") and "issuer=trustplane" in (
        enrolled.otpauth_uri
    )
    rows = await server.app.db.pool.fetch("SELECT mfa_pending, mfa_secret FROM principals")
    assert all(enrolled.secret.encode() not in bytes(r["mfa_pending"] or b"") for r in rows)
    totp = pyotp.TOTP(enrolled.secret)
    code = totp.now()
    now = time.time()
    valid = {totp.at(now + offset * 30) for offset in (-1, 0, 1)}
    wrong_code = next(c for c in ("000000", "111111", "222222") if c not in valid)
    wrong = await expect_error(
        server.auth.ConfirmMfa(pb.ConfirmMfaRequest(code=wrong_code), metadata=me)
    )
    assert (wrong.code, wrong.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MFA_CODE_INVALID")
    codes = list(
        (await server.auth.ConfirmMfa(pb.ConfirmMfaRequest(code=code), metadata=me)).recovery_codes
    )
    assert len(codes) == 10 and len(set(codes)) == 10
    required = await expect_error(login(server, password))
    assert (required.code, required.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MFA_REQUIRED")
    bad = await expect_error(
        server.auth.Login(
            pb.LoginRequest(tenant="acme", email=EMAIL, password=password, totp_code=wrong_code)
        )
    )
    assert (bad.code, bad.reason) == (grpc.StatusCode.UNAUTHENTICATED, "MFA_CODE_INVALID")
    # The code used to confirm was consumed: replaying it is refused (even across a step
    # boundary, it still matches the step it was used in).
    replay = await expect_error(
        server.auth.Login(
            pb.LoginRequest(tenant="acme", email=EMAIL, password=password, totp_code=code)
        )
    )
    assert replay.reason == "MFA_CODE_INVALID"
    ok = await server.auth.Login(
        pb.LoginRequest(tenant="acme", email=EMAIL, password=password, recovery_code=codes[0])
    )
    assert ok.tokens.access_token
    again = await expect_error(
        server.auth.Login(
            pb.LoginRequest(tenant="acme", email=EMAIL, password=password, recovery_code=codes[0])
        )
    )
    assert again.reason == "MFA_CODE_INVALID"  # single use
    await server.auth.DisableMfa(pb.DisableMfaRequest(code=codes[1]), metadata=me)
    assert (await login(server, password)).tokens.access_token


async def test_invitations(start_server):
    now = [time.time()]
    async with start_server(clock=lambda: now[0]) as server:
        _, _, password = await server.app.auth.bootstrap("acme", EMAIL)
        me = await _owner_token(server, password)

        async def invite(email, role="member"):
            return await server.auth.CreateInvitation(
                pb.CreateInvitationRequest(request_id=str(uuid.uuid4()), email=email, role=role),
                metadata=me,
            )

        first = await invite("new@acme.test")
        assert first.token.startswith("tpinv_")
        short = await expect_error(
            server.auth.AcceptInvitation(
                pb.AcceptInvitationRequest(token=first.token, password="short")
            )
        )
        assert short.field_violations[0][0] == "password"
        accepted = await server.auth.AcceptInvitation(
            pb.AcceptInvitationRequest(
                token=first.token, password="a-long-enough-password", display_name="New"
            )
        )
        assert accepted.tenant == "acme"
        logged = await login(server, "a-long-enough-password", email="new@acme.test")
        assert list(logged.roles) == ["member"]
        used = await expect_error(
            server.auth.AcceptInvitation(
                pb.AcceptInvitationRequest(token=first.token, password="a-long-enough-password")
            )
        )
        assert (used.code, used.reason, used.message) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "INVITATION_INVALID",
            "invitation is used",
        )
        revoked = await invite("r@acme.test")
        await server.auth.RevokeInvitation(
            pb.RevokeInvitationRequest(invitation_id=revoked.invitation_id), metadata=me
        )
        status = await expect_error(
            server.auth.AcceptInvitation(
                pb.AcceptInvitationRequest(token=revoked.token, password="a-long-enough-password")
            )
        )
        assert status.message == "invitation is revoked"
        expired = await invite("e@acme.test")
        now[0] += 7 * 86400 + 1
        status = await expect_error(
            server.auth.AcceptInvitation(
                pb.AcceptInvitationRequest(token=expired.token, password="a-long-enough-password")
            )
        )
        assert status.message == "invitation is expired"
        status = await expect_error(
            server.auth.AcceptInvitation(
                pb.AcceptInvitationRequest(token="tpinv_nope", password="a-long-enough-password")
            )
        )
        assert status.message == "invitation is unknown"
        member = bearer(logged.tokens.access_token)
        denied = await expect_error(
            server.auth.CreateInvitation(
                pb.CreateInvitationRequest(
                    request_id=str(uuid.uuid4()), email="x@acme.test", role="viewer"
                ),
                metadata=member,
            )
        )
        assert denied.reason == "PERMISSION_DENIED"  # members cannot invite at all


async def test_update_agent_and_users_with_masks_and_etags(server, tenant):
    owner, password = tenant
    me = await _owner_token(server, password)
    agent = (
        await server.auth.CreateAgent(
            pb.CreateAgentRequest(request_id=str(uuid.uuid4()), display_name="a", roles=["viewer"]),
            metadata=me,
        )
    ).agent
    mask = field_mask_pb2.FieldMask(paths=["purpose", "roles"])
    updated = (
        await server.auth.UpdateAgent(
            pb.UpdateAgentRequest(
                agent=pb.Agent(
                    agent_id=agent.agent_id,
                    purpose="triage",
                    roles=["member"],
                    display_name="ignored",
                    etag=agent.etag,
                ),
                update_mask=mask,
            ),
            metadata=me,
        )
    ).agent
    assert (updated.purpose, list(updated.roles), updated.display_name) == (
        "triage",
        ["member"],
        "a",
    )
    assert updated.etag != agent.etag
    stale = await expect_error(
        server.auth.UpdateAgent(
            pb.UpdateAgentRequest(
                agent=pb.Agent(agent_id=agent.agent_id, purpose="x", etag=agent.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["purpose"]),
            ),
            metadata=me,
        )
    )
    assert (stale.code, stale.reason) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    bad_mask = await expect_error(
        server.auth.UpdateAgent(
            pb.UpdateAgentRequest(
                agent=pb.Agent(agent_id=agent.agent_id),
                update_mask=field_mask_pb2.FieldMask(paths=["owner_id"]),
            ),
            metadata=me,
        )
    )
    assert bad_mask.field_violations[0][0] == "update_mask"
    users = (await server.auth.ListUsers(pb.ListUsersRequest(), metadata=me)).users
    assert [u.email for u in users] == [EMAIL]
    hashed = await asyncio.to_thread(server.app.auth._hasher.hash, "member-password-1")
    member = await _store(server).create_user(
        owner.tenant_id, "m@acme.test", hashed, ["viewer"], "M"
    )
    got = (await server.auth.GetUser(pb.GetUserRequest(user_id=member.id), metadata=me)).user
    promoted = (
        await server.auth.UpdateUser(
            pb.UpdateUserRequest(
                user=pb.User(user_id=member.id, roles=["member"], etag=got.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["roles"]),
            ),
            metadata=me,
        )
    ).user
    assert list(promoted.roles) == ["member"]
    member_token = (
        await login(server, "member-password-1", email="m@acme.test")
    ).tokens.access_token
    await server.auth.UpdateUser(
        pb.UpdateUserRequest(
            user=pb.User(user_id=member.id, disabled=True),
            update_mask=field_mask_pb2.FieldMask(paths=["disabled"]),
        ),
        metadata=me,
    )
    status = await expect_error(
        server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(member_token))
    )
    assert status.reason == "TOKEN_REVOKED"  # disabling a user cuts its tokens at once
    status = await expect_error(login(server, "member-password-1", email="m@acme.test"))
    assert status.reason == "LOGIN_FAILED"


async def test_api_key_rotation_overlaps(start_server):
    now = [time.time()]
    async with start_server(clock=lambda: now[0]) as server:
        _, _, password = await server.app.auth.bootstrap("acme", EMAIL)
        me = await _owner_token(server, password)
        old = await _user_key(server, me, seconds=30 * 86400)
        rotated = await server.auth.RotateApiKey(
            pb.RotateApiKeyRequest(
                request_id=str(uuid.uuid4()), key_id=old.metadata.key_id, overlap_seconds=3600
            ),
            metadata=me,
        )
        assert rotated.api_key != old.api_key and list(rotated.metadata.scopes) == ["auth.whoami"]
        assert rotated.previous.expire_time.seconds == pytest.approx(now[0] + 3600, abs=2)
        for key in (old.api_key, rotated.api_key):  # both work during the overlap
            assert (await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(key))).actor
        now[0] += 3601
        status = await expect_error(
            server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(old.api_key))
        )
        assert status.reason == "API_KEY_INVALID"
        assert (await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(rotated.api_key))).actor
        gone = await expect_error(
            server.auth.RotateApiKey(
                pb.RotateApiKeyRequest(request_id=str(uuid.uuid4()), key_id=old.metadata.key_id),
                metadata=me,
            )
        )
        assert gone.code is grpc.StatusCode.NOT_FOUND


async def test_service_accounts_and_tenant_key_cap(server, tenant):
    _, password = tenant
    me = await _owner_token(server, password)
    account = (
        await server.auth.CreateAgent(
            pb.CreateAgentRequest(
                request_id=str(uuid.uuid4()),
                display_name="ci-runner",
                roles=["member"],
                principal_type=actor_pb2.PRINCIPAL_TYPE_SERVICE_ACCOUNT,
            ),
            metadata=me,
        )
    ).agent
    await server.auth.CreateAgent(
        pb.CreateAgentRequest(request_id=str(uuid.uuid4()), display_name="bot", roles=[]),
        metadata=me,
    )
    assert account.principal_type == actor_pb2.PRINCIPAL_TYPE_SERVICE_ACCOUNT
    only = await server.auth.ListAgents(
        pb.ListAgentsRequest(principal_type=actor_pb2.PRINCIPAL_TYPE_SERVICE_ACCOUNT), metadata=me
    )
    assert [a.agent_id for a in only.agents] == [account.agent_id]
    both = await server.auth.ListAgents(pb.ListAgentsRequest(), metadata=me)
    assert len(both.agents) == 2
    key = (
        await server.auth.CreateApiKey(
            pb.CreateApiKeyRequest(
                request_id=str(uuid.uuid4()),
                principal_id=account.agent_id,
                expire_time=_later(3600),
            ),
            metadata=me,
        )
    ).api_key
    who = await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(key))
    assert who.actor.subject_type == actor_pb2.PRINCIPAL_TYPE_SERVICE_ACCOUNT
    # The tenant caps API-key lifetimes.
    tenant_info = (await server.auth.GetTenant(pb.GetTenantRequest(), metadata=me)).tenant
    assert (tenant_info.name, tenant_info.api_key_max_ttl_days) == ("acme", 90)
    updated = (
        await server.auth.UpdateTenant(
            pb.UpdateTenantRequest(
                tenant=pb.Tenant(api_key_max_ttl_days=7),
                update_mask=field_mask_pb2.FieldMask(paths=["api_key_max_ttl_days"]),
            ),
            metadata=me,
        )
    ).tenant
    assert updated.api_key_max_ttl_days == 7
    too_long = await expect_error(
        server.auth.CreateApiKey(
            pb.CreateApiKeyRequest(request_id=str(uuid.uuid4()), expire_time=_later(8 * 86400)),
            metadata=me,
        )
    )
    assert too_long.field_violations[0][0] == "expire_time"
    assert "7 days" in too_long.field_violations[0][1]
    assert (
        await server.auth.CreateApiKey(
            pb.CreateApiKeyRequest(request_id=str(uuid.uuid4()), expire_time=_later(6 * 86400)),
            metadata=me,
        )
    ).api_key


async def _exchange(server, subject_token, actor_token, scopes=("auth.whoami",)):
    return (
        await server.auth.ExchangeToken(
            pb.ExchangeTokenRequest(
                subject_token=subject_token, actor_token=actor_token, scopes=list(scopes)
            )
        )
    ).access_token


async def _disable(server, me, agent_id):
    await server.auth.SetAgentDisabled(
        pb.SetAgentDisabledRequest(agent_id=agent_id, disabled=True), metadata=me
    )


async def test_kill_switch_reaches_delegated_tokens_anywhere_in_the_chain(server, tenant):
    """Disabling an agent kills every token it acts in at once: `sub` = the user, the agent in
    `act` (directly, or as the prior actor of a sub-agent) — not only tokens whose `sub` it is."""
    _, password = tenant
    user_token = (await login(server, password)).tokens.access_token
    me = bearer(user_token)
    agent, agent_key = await _agent_with_key(server, me, ["member"])
    sub_agent, sub_agent_key = await _agent_with_key(server, me, ["member"])
    bystander, bystander_key = await _agent_with_key(server, me, ["member"])
    direct = await _exchange(server, user_token, agent_key)
    nested = await _exchange(server, direct, sub_agent_key)  # user → agent → sub-agent
    unrelated = await _exchange(server, user_token, bystander_key)
    for token in (direct, nested, unrelated):
        assert (await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(token))).actor
    await _disable(server, me, agent.agent_id)  # the inner actor of `nested`
    for token in (direct, nested):
        status = await expect_error(server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(token)))
        assert (status.code, status.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
    # The user's session and other agents' delegations are untouched.
    assert (await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=me)).actor
    assert (await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(unrelated))).actor
    # Disabling the outermost actor of a chain works the same way.
    second = await _exchange(server, unrelated, sub_agent_key)  # user → bystander → sub-agent
    await _disable(server, me, sub_agent.agent_id)
    status = await expect_error(server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(second)))
    assert status.reason == "TOKEN_REVOKED"
    assert (
        bystander.agent_id
        and (await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(unrelated))).actor
    )


async def _user_key(server, me, scopes=("auth.whoami",), seconds=3600):
    return await server.auth.CreateApiKey(
        pb.CreateApiKeyRequest(
            request_id=str(uuid.uuid4()), scopes=list(scopes), expire_time=_later(seconds)
        ),
        metadata=me,
    )


async def test_delegated_tokens_die_with_the_api_keys_they_came_from(server, tenant):
    """A token exchanged from a user's API key has no `sid`; it is bound to the key instead
    (and to the agent's key), so revoking either credential kills it — and the chains built on
    it — on the next call."""
    _, password = tenant
    me = await _owner_token(server, password)
    user_key = await _user_key(server, me)
    _, agent_key = await _agent_with_key(server, me, ["member"])
    _, sub_agent_key = await _agent_with_key(server, me, ["member"])
    direct = await _exchange(server, user_key.api_key, agent_key)
    nested = await _exchange(server, direct, sub_agent_key)
    claims = jwt.decode(direct, options={"verify_signature": False})
    assert "sid" not in claims and user_key.metadata.key_id in claims["derived_from"]
    for token in (direct, nested):
        assert (await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(token))).actor
    await server.auth.RevokeApiKey(
        pb.RevokeApiKeyRequest(key_id=user_key.metadata.key_id), metadata=me
    )
    for token in (direct, nested):
        status = await expect_error(server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(token)))
        assert (status.code, status.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
    # The agent's side: revoking the key the agent exchanged with kills its token as well.
    other_key = await _user_key(server, me)
    token = await _exchange(server, other_key.api_key, agent_key)
    assert (await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(token))).actor
    await server.auth.RevokeApiKey(
        pb.RevokeApiKeyRequest(key_id=agent_key.split("_")[2]), metadata=me
    )
    status = await expect_error(server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(token)))
    assert status.reason == "TOKEN_REVOKED"
    assert (await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(other_key.api_key))).actor


async def test_delegated_token_dies_with_the_user_token_it_came_from(server, tenant):
    _, password = tenant
    user_token = (await login(server, password)).tokens.access_token
    _, agent_key = await _agent_with_key(server, bearer(user_token), ["member"])
    delegated = await _exchange(server, user_token, agent_key)
    await server.auth.RevokeToken(
        pb.RevokeTokenRequest(token=user_token), metadata=bearer(user_token)
    )
    status = await expect_error(server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(delegated)))
    assert status.reason == "TOKEN_REVOKED"


async def test_delegated_token_never_outlives_its_api_key(start_server):
    now = [time.time()]
    async with start_server(clock=lambda: now[0]) as server:
        _, _, password = await server.app.auth.bootstrap("acme", EMAIL)
        me = await _owner_token(server, password)
        soon = await _user_key(server, me, seconds=120)
        _, agent_key = await _agent_with_key(server, me, ["member"])
        exchanged = await server.auth.ExchangeToken(
            pb.ExchangeTokenRequest(
                subject_token=soon.api_key, actor_token=agent_key, scopes=["auth.whoami"]
            )
        )
        assert exchanged.expire_time.seconds <= soon.metadata.expire_time.seconds
        # Half a second before the key's own expiry (taken from the key, not from the test's
        # start: bootstrap and login take real time the injected clock does not see), the key
        # still verifies, but a token from it would be dead on arrival.
        now[0] = soon.metadata.expire_time.ToNanoseconds() / 1e9 - 0.5
        late = await expect_error(
            server.auth.ExchangeToken(
                pb.ExchangeTokenRequest(
                    subject_token=soon.api_key, actor_token=agent_key, scopes=["auth.whoami"]
                )
            )
        )
        assert (late.code, late.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED")


async def _user(server, tenant_id, email, role):
    hashed = await asyncio.to_thread(server.app.auth._hasher.hash, f"{role}-password-12")
    user = await _store(server).create_user(tenant_id, email, hashed, [role], role)
    return user, f"{role}-password-12"


async def test_admins_list_and_revoke_any_session_of_the_tenant(server, tenant, idp):
    owner, _ = tenant
    admin, admin_password = await _user(server, owner.tenant_id, "a@acme.test", "admin")
    member, member_password = await _user(server, owner.tenant_id, "m@acme.test", "member")
    admin_tokens = (await login(server, admin_password, email="a@acme.test")).tokens
    as_admin = bearer(admin_tokens.access_token)
    mine = [(await login(server, member_password, email="m@acme.test")).tokens for _ in range(3)]
    as_member = bearer(mine[0].access_token)

    # An admin pages through a member's sessions (newest first, two per page).
    first = await server.auth.ListSessions(
        pb.ListSessionsRequest(principal_id=member.id, page_size=2), metadata=as_admin
    )
    assert len(first.sessions) == 2 and first.next_page_token
    rest = await server.auth.ListSessions(
        pb.ListSessionsRequest(
            principal_id=member.id, page_size=2, page_token=first.next_page_token
        ),
        metadata=as_admin,
    )
    assert len(rest.sessions) == 1 and not rest.next_page_token
    listed = [*first.sessions, *rest.sessions]
    assert [s.session_id for s in listed] == [t.session_id for t in reversed(mine)]
    assert {s.principal_id for s in listed} == {member.id} and not any(s.current for s in listed)
    # The page token is bound to its query: not reusable for another principal.
    status = await expect_error(
        server.auth.ListSessions(
            pb.ListSessionsRequest(principal_id=owner.id, page_token=first.next_page_token),
            metadata=as_admin,
        )
    )
    assert status.reason == "PAGE_TOKEN_INVALID"

    # A member sees only its own; naming someone else is refused outright.
    own = await server.auth.ListSessions(
        pb.ListSessionsRequest(principal_id=member.id), metadata=as_member
    )
    assert len(own.sessions) == 3 and [s.current for s in own.sessions].count(True) == 1
    for call in (
        server.auth.ListSessions(pb.ListSessionsRequest(principal_id=admin.id), metadata=as_member),
        server.auth.RevokeAllSessions(
            pb.RevokeAllSessionsRequest(principal_id=admin.id), metadata=as_member
        ),
    ):
        status = await expect_error(call)
        assert (status.code, status.reason, status.metadata) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "PERMISSION_DENIED",
            {"permission": "auth.sessions.manage"},
        )
    status = await expect_error(
        server.auth.RevokeSession(
            pb.RevokeSessionRequest(session_id=admin_tokens.session_id), metadata=as_member
        )
    )
    assert status.code is grpc.StatusCode.NOT_FOUND  # indistinguishable from a missing one
    assert (await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=as_admin)).actor

    # Another tenant's admin finds neither the principal nor its sessions.
    stranger = bearer(idp.token(roles=["admin"]))
    for call in (
        server.auth.ListSessions(pb.ListSessionsRequest(principal_id=member.id), metadata=stranger),
        server.auth.RevokeSession(
            pb.RevokeSessionRequest(session_id=mine[1].session_id), metadata=stranger
        ),
        server.auth.RevokeAllSessions(
            pb.RevokeAllSessionsRequest(principal_id=member.id), metadata=stranger
        ),
    ):
        assert (await expect_error(call)).code is grpc.StatusCode.NOT_FOUND
    assert await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(mine[1].access_token))

    # The admin revokes one session of the member, then all the others.
    await server.auth.RevokeSession(
        pb.RevokeSessionRequest(session_id=mine[1].session_id), metadata=as_admin
    )
    status = await expect_error(
        server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(mine[1].access_token))
    )
    assert status.reason == "TOKEN_REVOKED"
    assert (await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=as_member)).actor
    done = await server.auth.RevokeAllSessions(
        pb.RevokeAllSessionsRequest(principal_id=member.id), metadata=as_admin
    )
    assert done.revoked == 2
    for tokens in mine:
        status = await expect_error(
            server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(tokens.access_token))
        )
        assert status.reason == "TOKEN_REVOKED"
    assert (await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=as_admin)).actor


def _stamp(seconds):
    from google.protobuf import timestamp_pb2

    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


async def test_login_with_a_totp_code(server, tenant):
    owner, password = tenant
    me = await _owner_token(server, password)
    secret = (await server.auth.EnrollMfa(pb.EnrollMfaRequest(), metadata=me)).secret
    totp = pyotp.TOTP(secret)
    await server.auth.ConfirmMfa(pb.ConfirmMfaRequest(code=totp.now()), metadata=me)
    # The confirming code is spent; the next step's code is within the ±30 s window.
    code = totp.at(time.time() + 30)
    request = pb.LoginRequest(tenant="acme", email=EMAIL, password=password, totp_code=code)
    logged = await server.auth.Login(request)
    assert logged.actor.subject_id == owner.id and logged.tokens.refresh_token
    who = await server.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(logged.tokens.access_token))
    assert who.session_id == logged.tokens.session_id
    replayed = await expect_error(server.auth.Login(request))  # each code works once
    assert replayed.reason == "MFA_CODE_INVALID"
    wrong_password = await expect_error(
        server.auth.Login(
            pb.LoginRequest(tenant="acme", email=EMAIL, password="nope", totp_code=code)
        )
    )
    assert wrong_password.reason == "LOGIN_FAILED"  # the code never helps a wrong password


async def test_many_accounts_from_one_address_back_off(start_server):
    """Spraying one password over many accounts from one address: each account stays under
    its own limit (2), the address's counter (4 * 2) throttles the spray."""
    async with start_server(TRUSTPLANE_LOGIN_MAX_ATTEMPTS="2") as running:
        await running.app.auth.bootstrap("acme", EMAIL)
        for i in range(8):
            status = await expect_error(login(running, "spray-1", email=f"user{i}@acme.test"))
            assert status.reason == "LOGIN_FAILED", i
        status = await expect_error(login(running, "spray-1", email="user8@acme.test"))
        assert (status.code, status.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "LOGIN_THROTTLED",
        )
        assert status.retry_delay is not None and 0 < status.retry_delay <= 60


async def test_lockout_doubles_with_an_injected_clock(start_server):
    now = [time.time()]
    env = {"TRUSTPLANE_LOGIN_MAX_ATTEMPTS": "2", "TRUSTPLANE_LOGIN_WINDOW": "60"}
    async with start_server(clock=lambda: now[0], **env) as running:
        _, _, password = await running.app.auth.bootstrap("acme", EMAIL)
        for lock in (60, 120, 240):
            for _ in range(2):
                assert (await expect_error(login(running, "wrong"))).reason == "LOGIN_FAILED"
            locked = await expect_error(login(running, password))  # even the right password
            assert locked.reason == "LOGIN_THROTTLED"
            assert locked.retry_delay == pytest.approx(lock, abs=1)
            now[0] += lock - 5
            still = await expect_error(login(running, password))
            assert still.reason == "LOGIN_THROTTLED"
            assert still.retry_delay == pytest.approx(5, abs=1)
            now[0] += 6  # the lock is over: counting starts again, the next lock is twice as long
        assert (await login(running, password)).tokens.access_token


async def test_last_use_is_written_at_most_once_a_minute(start_server):
    now = [time.time()]
    async with start_server(clock=lambda: now[0]) as running:
        _, _, password = await running.app.auth.bootstrap("acme", EMAIL)
        me = await _owner_token(running, password)
        agent, key = await _agent_with_key(running, me, ["viewer"])
        api_keys = running.app.api_keys

        async def seen():
            await api_keys.flush()  # what the background job does every sweep interval
            listed = await running.auth.ListApiKeys(
                pb.ListApiKeysRequest(principal_id=agent.agent_id), metadata=me
            )
            got = await running.auth.GetAgent(
                pb.GetAgentRequest(agent_id=agent.agent_id), metadata=me
            )
            return listed.api_keys[0].last_used_time.seconds, got.agent.last_seen_time.seconds

        assert await seen() == (0, 0)
        start = now[0]
        await running.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(key))
        assert await seen() == (int(start), int(start))
        for step in (20, 20, 19):  # 59 s of use: coalesced, nothing new is written
            now[0] += step
            await running.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(key))
            assert await seen() == (int(start), int(start))
        now[0] += 2  # a minute after the last write
        await running.auth.WhoAmI(pb.WhoAmIRequest(), metadata=_api(key))
        assert await seen() == (int(now[0]), int(now[0]))
        # What it remembers to coalesce is bounded: entries older than a minute are dropped.
        assert len(api_keys._touched) == 1
        now[0] += 61
        await api_keys.flush()
        assert api_keys._touched == {}


async def _wait_for(predicate, timeout=10.0):
    async with asyncio.timeout(timeout):
        while True:
            if await predicate():
                return
            await asyncio.sleep(0.05)


async def test_token_signing_key_rotates_with_overlap_until_destroyed(start_server):
    """The access-token key rotates by its period in the crypto sweeper: new tokens get the new
    kid, older tokens keep verifying (GetJwks and the server) while their version exists —
    scheduled for destruction included — and stop once it is destroyed."""
    from server.auth.model import SYSTEM_TENANT, TOKEN_KEY

    now = [time.time()]
    env = {"TRUSTPLANE_CRYPTO_SWEEP_INTERVAL": "0.05", "TRUSTPLANE_TOKEN_KEY_ROTATION": "172800"}
    async with start_server(clock=lambda: now[0], **env) as running:
        crypto = running.app.crypto
        key = await crypto.get_key(SYSTEM_TENANT, TOKEN_KEY)
        assert key.rotation_period == 172800
        assert key.next_rotation_at == pytest.approx(now[0] + 172800, abs=5)
        _, _, password = await running.app.auth.bootstrap("acme", EMAIL)
        old = (await login(running, password)).tokens.access_token

        async def primary_is(version):
            return (await crypto.get_key(SYSTEM_TENANT, TOKEN_KEY)).primary_version == version

        now[0] += 172800 + 1  # the rotation is due: the sweeper does it
        await _wait_for(lambda: primary_is(2))
        now[0] = time.time()  # back to the wall clock, which the token verifier uses
        new = (await login(running, password)).tokens.access_token
        old_kid, new_kid = (jwt.get_unverified_header(t)["kid"] for t in (old, new))
        assert (old_kid, new_kid) == (f"{key.key_id}.1", f"{key.key_id}.2")

        async def published():
            jwks = json.loads((await running.auth.GetJwks(pb.GetJwksRequest())).jwks)
            return {k["kid"]: jwt.PyJWK(k).key for k in jwks["keys"]}

        async def accepted(token):
            try:
                await running.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(token))
            except grpc.aio.AioRpcError as error:
                assert error.code() is grpc.StatusCode.UNAUTHENTICATED
                return False
            return True

        keys = await published()
        for token, kid in ((old, old_kid), (new, new_kid)):
            assert await accepted(token)
            claims = jwt.decode(token, keys[kid], algorithms=["EdDSA"], audience="trustplane")
            assert claims["sub"]
        # Scheduled for destruction: still published, its tokens still verify.
        await crypto.schedule_destruction(SYSTEM_TENANT, TOKEN_KEY, 1, 1)
        assert old_kid in await published() and await accepted(old)
        # Destroyed: unpublished, and the server stops accepting its tokens (cache included).
        now[0] += 86400 + 1
        await _wait_for(lambda: primary_is(2))

        async def destroyed():
            versions = (await crypto.get_key(SYSTEM_TENANT, TOKEN_KEY)).versions
            return versions[0].state.value == "destroyed"

        await _wait_for(destroyed)
        now[0] = time.time()
        assert set(await published()) == {new_kid}

        async def refused():
            return not await accepted(old)

        await _wait_for(refused)
        status = await expect_error(running.auth.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(old)))
        assert status.reason == "TOKEN_SIGNATURE_INVALID"
        assert await accepted(new)
