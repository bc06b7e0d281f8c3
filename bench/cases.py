"""What `make bench` measures: one `Case` per hot RPC.

Adding a case (e.g. in the issue that adds `SessionService/Create`):

1. write `async def _create_session(ctx: BenchContext) -> Case:` below; it may do any setup
   through `ctx.channel` first (create a tenant, get a token) and returns the case with the
   encoded request (`SerializeToString()`, not framed) and its headers (e.g.
   `(("authorization", f"Bearer {token}"),)`);
2. append it to `BUILDERS` (or, when it needs a differently configured server, add it to a
   `Variant` in `VARIANTS`: those run against a server of their own).

Every case runs against the same server process, in `BUILDERS` order, and must leave only OK
statuses: the bench fails if the server counts any other code for the case's method. The echo
ceiling sends the first case's request bytes, so keep the small `Health/Check` first. A case
with `unique_field` (a fresh request id per call, which h2load cannot send) is driven by
`bench.grpcload` and compared with an echo ceiling measured by that generator.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import grpc.aio
from google.protobuf import field_mask_pb2, struct_pb2, timestamp_pb2
from grpc_health.v1 import health_pb2
from tptest.v1 import test_service_pb2
from trustplane.audit.v1 import audit_pb2
from trustplane.auth.v1 import auth_pb2, auth_pb2_grpc
from trustplane.crypto.v1 import crypto_pb2, crypto_pb2_grpc
from trustplane.policy.v1 import policy_pb2, policy_pb2_grpc
from trustplane.session.v1 import session_pb2, session_pb2_grpc

from tests.support.tokens import TestIdP

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class BenchContext:
    """What a case builder may use for its setup: the running trustplane server."""

    address: str  # host:port of the gRPC listener (plaintext)
    channel: grpc.aio.Channel  # an open channel to `address`
    idp: TestIdP  # issues tokens the server trusts
    tenant: str  # a bootstrapped tenant and its owner (for Auth cases)
    email: str
    password: str


@dataclass(frozen=True)
class Case:
    """One measured RPC: h2load sends `request` (framed) to `path` with `headers`."""

    name: str  # the row label, e.g. "grpc.health.v1.Health/Check"
    path: str  # "/package.Service/Method", also the `method` label in the server's metrics
    request: bytes  # the serialized request message (the bench adds the gRPC frame)
    target_ratio: float  # minimum req/s relative to the bare echo ceiling
    headers: Headers = ()  # extra request headers, e.g. authorization
    requests: int | None = None  # fewer requests than BENCH_REQUESTS, for slow RPCs
    items: int = 1  # items per request, for batch RPCs (the table shows items/s)
    target_items_per_s: float = 0.0  # a throughput target replacing the ratio target
    # Non-zero: a fresh UUID in this string field of every request (a request id), sent by the
    # grpc.aio generator (bench.grpcload) instead of h2load and measured against an echo
    # ceiling taken with that generator.
    unique_field: int = 0
    # The name of another case: `target_ratio` is then this case's req/s over that case's
    # (e.g. the audited mutation over the same one with audit off) instead of over the echo.
    ratio_to: str = ""
    target_p99_ms: float = 0.0  # non-zero: the median run's p99 must also be at most this


CaseBuilder = Callable[[BenchContext], Awaitable[Case]]


async def _health_check(ctx: BenchContext) -> Case:
    """`Health/Check` for the whole server: the cheapest call through the full chain."""
    return Case(
        name="grpc.health.v1.Health/Check",
        path="/grpc.health.v1.Health/Check",
        request=health_pb2.HealthCheckRequest(service="").SerializeToString(),
        target_ratio=0.8,
    )


async def _authenticated(ctx: BenchContext) -> Case:
    """An authenticated unary method through the whole chain (verified-token cache warm after
    the warm-up run): authenticate, rate limit, authorize, then the handler."""
    token = ctx.idp.token(roles=["member"], exp=int(time.time()) + 3600)
    return Case(
        name="tptest.v1.TestService/WhoAmI (JWT)",
        path="/tptest.v1.TestService/WhoAmI",
        request=test_service_pb2.WhoAmIRequest().SerializeToString(),
        target_ratio=0.6,
        headers=(("authorization", f"Bearer {token}"),),
    )


async def _crypto_key(ctx: BenchContext) -> Headers:
    """An admin token and an ENCRYPT_DECRYPT key named `bench` (created once)."""
    token = ctx.idp.token(roles=["admin"], exp=int(time.time()) + 3600)
    headers = (("authorization", f"Bearer {token}"),)
    stub = crypto_pb2_grpc.CryptoServiceStub(ctx.channel)
    request = crypto_pb2.CreateKeyRequest(
        request_id="00000000-0000-4000-8000-00000000be9c",
        name="bench",
        purpose=crypto_pb2.KEY_PURPOSE_ENCRYPT_DECRYPT,
    )
    await stub.CreateKey(request, metadata=headers)
    return headers


async def _encrypt(ctx: BenchContext) -> Case:
    """Encrypt 1 KiB: authenticated, key metadata and material cached, AES-256-GCM."""
    request = crypto_pb2.EncryptRequest(name="bench", plaintext=bytes(1024), associated_data=b"a")
    return Case(
        name="CryptoService/Encrypt (1 KiB)",
        path="/trustplane.crypto.v1.CryptoService/Encrypt",
        request=request.SerializeToString(),
        target_ratio=0.5,
        headers=await _crypto_key(ctx),
    )


async def _batch_encrypt(ctx: BenchContext) -> Case:
    """BatchEncrypt of 100 x 1 KiB in one call."""
    items = [crypto_pb2.EncryptItem(plaintext=bytes(1024), associated_data=b"a")] * 100
    request = crypto_pb2.BatchEncryptRequest(name="bench", items=items)
    return Case(
        name="CryptoService/BatchEncrypt (100 x 1 KiB)",
        path="/trustplane.crypto.v1.CryptoService/BatchEncrypt",
        request=request.SerializeToString(),
        target_ratio=0.0,
        headers=await _crypto_key(ctx),
        items=100,
        target_items_per_s=100_000,
        requests=5000,
    )


async def _audited_mutation(ctx: BenchContext) -> Case:
    """UpdateKey (labels): a SECURITY-class mutation, answered only after its audit entry is
    committed (group commit under load); its target is ≥ 0.8 of the same mutation on a server
    with TRUSTPLANE_AUDIT=off (the `audit-off` variant): the audit layer's cost."""
    key = crypto_pb2.Key(name="bench", labels={"bench": "yes"})
    request = crypto_pb2.UpdateKeyRequest(
        key=key, update_mask=field_mask_pb2.FieldMask(paths=["labels"])
    )
    return Case(
        name="CryptoService/UpdateKey (audited, durable)",
        path="/trustplane.crypto.v1.CryptoService/UpdateKey",
        request=request.SerializeToString(),
        target_ratio=0.8,
        headers=await _crypto_key(ctx),
        requests=5000,
        ratio_to=_UNAUDITED_MUTATION,
    )


_UNAUDITED_MUTATION = "CryptoService/UpdateKey (audit off)"


async def _unaudited_mutation(ctx: BenchContext) -> Case:
    """The same UpdateKey on a server with TRUSTPLANE_AUDIT=off: the audited case's baseline."""
    audited = await _audited_mutation(ctx)
    return dataclasses.replace(audited, name=_UNAUDITED_MUTATION, target_ratio=0.0, ratio_to="")


async def _audit_append(ctx: BenchContext) -> Case:
    """AppendEntries of 100 events: validated, committed in a group commit, then answered."""
    token = ctx.idp.token(roles=["member"], exp=int(time.time()) + 3600)
    event = audit_pb2.AuditEvent(
        event_type="tool.invoke", resource="search", attributes={"query_chars": "42"}
    )
    request = audit_pb2.AppendEntriesRequest(events=[event] * 100)
    return Case(
        name="AuditService/AppendEntries (100 events)",
        path="/trustplane.audit.v1.AuditService/AppendEntries",
        request=request.SerializeToString(),
        target_ratio=0.0,
        headers=(("authorization", f"Bearer {token}"),),
        items=100,
        target_items_per_s=20_000,
        requests=2000,
    )


async def _login(ctx: BenchContext) -> Case:
    """Login: argon2id verification (~tens of ms of CPU by design); reported, no target."""
    request = auth_pb2.LoginRequest(tenant=ctx.tenant, email=ctx.email, password=ctx.password)
    return Case(
        name="AuthService/Login (argon2id)",
        path="/trustplane.auth.v1.AuthService/Login",
        request=request.SerializeToString(),
        target_ratio=0.0,
        requests=200,
    )


async def _owner_token(ctx: BenchContext) -> str:
    stub = auth_pb2_grpc.AuthServiceStub(ctx.channel)
    request = auth_pb2.LoginRequest(tenant=ctx.tenant, email=ctx.email, password=ctx.password)
    return str((await stub.Login(request)).tokens.access_token)


async def _whoami_jwt(ctx: BenchContext) -> Case:
    """WhoAmI with an access token trustplane issued (EdDSA, verified-token cache warm)."""
    token = await _owner_token(ctx)
    return Case(
        name="AuthService/WhoAmI (own JWT)",
        path="/trustplane.auth.v1.AuthService/WhoAmI",
        request=auth_pb2.WhoAmIRequest().SerializeToString(),
        target_ratio=0.5,
        headers=(("authorization", f"Bearer {token}"),),
    )


async def _whoami_api_key(ctx: BenchContext) -> Case:
    """WhoAmI with an API key (checksum, HMAC under the keyring's MAC key, cached 30 s)."""
    token = await _owner_token(ctx)
    stub = auth_pb2_grpc.AuthServiceStub(ctx.channel)
    expires = timestamp_pb2.Timestamp(seconds=int(time.time()) + 86400)
    created = await stub.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(request_id=str(uuid.uuid4()), expire_time=expires),
        metadata=(("authorization", f"Bearer {token}"),),
    )
    return Case(
        name="AuthService/WhoAmI (API key)",
        path="/trustplane.auth.v1.AuthService/WhoAmI",
        request=auth_pb2.WhoAmIRequest().SerializeToString(),
        target_ratio=0.5,
        headers=(("x-api-key", created.api_key),),
    )


def _agent_headers(ctx: BenchContext) -> Headers:
    token = ctx.idp.token(sub="bench-agent", ptype="agent", exp=int(time.time()) + 3600)
    return (("authorization", f"Bearer {token}"),)


_SESSION_REQUEST_ID = "00000000-0000-4000-8000-00000005e551"


async def _create_session(ctx: BenchContext) -> Case:
    """CreateSession with a fresh request id per call, from the grpc.aio generator: every call
    a durable create — the session and its first revision inserted, its SECURITY-class audit
    entry committed before the answer — through the whole chain (idempotency claims a new key
    each time). The ratio is to the echo ceiling measured with the same generator."""
    request = session_pb2.CreateSessionRequest(role="bench", labels=["untrusted_input"])
    field = session_pb2.CreateSessionRequest.DESCRIPTOR.fields_by_name["request_id"].number
    return Case(
        name="SessionService/CreateSession (unique request ids: durable creates)",
        path="/trustplane.session.v1.SessionService/CreateSession",
        request=request.SerializeToString(),
        target_ratio=0.25,
        headers=_agent_headers(ctx),
        requests=5000,
        unique_field=field,
    )


async def _create_session_replay(ctx: BenchContext) -> Case:
    """CreateSession replayed: h2load sends the same bytes on every stream, so one request id:
    the first call inserts the session, every later one is an authenticated, authorized,
    durably audited idempotent replay of it (no insert), as a retry storm would be."""
    request = session_pb2.CreateSessionRequest(
        request_id=_SESSION_REQUEST_ID, role="bench", labels=["untrusted_input"]
    )
    return Case(
        name="SessionService/CreateSession (one request id: idempotent replays)",
        path="/trustplane.session.v1.SessionService/CreateSession",
        request=request.SerializeToString(),
        target_ratio=0.25,
        headers=_agent_headers(ctx),
        requests=5000,
    )


async def _get_session(ctx: BenchContext) -> Case:
    """GetSession: the agent's status check, answered from the shared session read (one
    indexed row by primary key, then reused until the session changes)."""
    return await _get_session_case(ctx, "SessionService/GetSession", 0.5)


async def _get_session_unshared(ctx: BenchContext) -> Case:
    """The same status check on a server with TRUSTPLANE_SESSION_READ_TTL=0: a PostgreSQL read
    on every call (reported only)."""
    return await _get_session_case(ctx, "SessionService/GetSession (read cache off)", 0.0)


async def _get_session_case(ctx: BenchContext, name: str, target_ratio: float) -> Case:
    headers = _agent_headers(ctx)
    stub = session_pb2_grpc.SessionServiceStub(ctx.channel)
    created = await stub.CreateSession(
        session_pb2.CreateSessionRequest(
            request_id=_SESSION_REQUEST_ID, role="bench", labels=["untrusted_input"]
        ),
        metadata=headers,
    )
    request = session_pb2.GetSessionRequest(session_id=created.session.session_id)
    return Case(
        name=name,
        path="/trustplane.session.v1.SessionService/GetSession",
        request=request.SerializeToString(),
        target_ratio=target_ratio,
        headers=headers,
    )


_POLICY_BUNDLE = """
version: bench-1
derived_roles:
  owner:
    parent_roles: [member]
    condition: has(resource.attr.owner) && resource.attr.owner == principal.id
resource_policies:
  - resource: tool
    rules:
      - name: members-invoke
        actions: [invoke]
        roles: [member]
        effect: ALLOW
      - name: owners-configure
        actions: [configure]
        derived_roles: [owner]
        effect: ALLOW
      - name: no-exfiltration
        actions: [invoke]
        roles: ["*"]
        effect: DENY
        condition: >-
          resource.id in ['send_email', 'http_post'] &&
          'untrusted_input' in session.labels && 'private_data' in session.labels
"""


async def _policy_check_request(ctx: BenchContext) -> tuple[bytes, Headers]:
    """Activates the bench bundle for the test IdP's tenant; a member's Check of 2 tools x
    (invoke, configure) in a stored session labelled `private_data` (its agent acting for the
    member created it, so the member takes part in it; the Check reads its labels), as encoded
    request and headers."""
    admin = ctx.idp.token(roles=["admin"], exp=int(time.time()) + 3600)
    stub = policy_pb2_grpc.PolicyServiceStub(ctx.channel)
    put = policy_pb2.PutBundleRequest(source=_POLICY_BUNDLE, activate=True)
    await stub.PutBundle(put, metadata=(("authorization", f"Bearer {admin}"),))
    expires = int(time.time()) + 3600
    member = ctx.idp.token(roles=["member"], sub="bench-user", exp=expires)
    delegated = ctx.idp.token(
        roles=["member"],
        sub="bench-user",
        act={"sub": "bench-agent", "ptype": "agent"},
        exp=expires,
    )
    session = await session_pb2_grpc.SessionServiceStub(ctx.channel).CreateSession(
        session_pb2.CreateSessionRequest(
            request_id=str(uuid.uuid4()), role="bench", labels=["private_data"]
        ),
        metadata=(("authorization", f"Bearer {delegated}"),),
    )
    owned = struct_pb2.Struct()
    owned.update({"owner": "bench-user"})
    request = policy_pb2.CheckRequest(
        resources=[
            policy_pb2.Resource(kind="tool", id="search", attr=owned),
            policy_pb2.Resource(kind="tool", id="send_email"),
        ],
        actions=["invoke", "configure"],
        session=policy_pb2.SessionContext(id=session.session.session_id),
    )
    return request.SerializeToString(), (("authorization", f"Bearer {member}"),)


async def _policy_check(ctx: BenchContext) -> Case:
    """Check, 2 resources x 2 actions, with conditions and a derived role; the decision cache is
    warm after the warm-up run (the in-process active-version cache too)."""
    request, headers = await _policy_check_request(ctx)
    return Case(
        name="PolicyService/Check (2x2, warm decision cache)",
        path="/trustplane.policy.v1.PolicyService/Check",
        request=request,
        target_ratio=0.5,
        headers=headers,
        target_p99_ms=10.0,
    )


async def _policy_check_uncached(ctx: BenchContext) -> Case:
    """The same Check on a server started with the decision cache off: every request evaluates
    four decisions (CEL included) afresh."""
    request, headers = await _policy_check_request(ctx)
    return Case(
        name="PolicyService/Check (2x2, decision cache off)",
        path="/trustplane.policy.v1.PolicyService/Check",
        request=request,
        target_ratio=0.0,
        headers=headers,
    )


@dataclass(frozen=True)
class Variant:
    """Cases measured against a server of their own, started with `env` on top of the bench's
    settings. Like every case they run by default; with BENCH_CASES set, only when it selects
    one of them (and then their server is not started otherwise)."""

    name: str
    env: Mapping[str, str]
    builders: list[tuple[str, CaseBuilder]]  # (case name, builder)


VARIANTS: list[Variant] = [
    Variant(
        "decision-cache-off",
        {"TRUSTPLANE_POLICY_DECISION_CACHE_SIZE": "0"},
        [("PolicyService/Check (2x2, decision cache off)", _policy_check_uncached)],
    ),
    Variant("audit-off", {"TRUSTPLANE_AUDIT": "off"}, [(_UNAUDITED_MUTATION, _unaudited_mutation)]),
    Variant(
        "session-read-cache-off",
        {"TRUSTPLANE_SESSION_READ_TTL": "0"},
        [("SessionService/GetSession (read cache off)", _get_session_unshared)],
    ),
]


BUILDERS: list[CaseBuilder] = [
    _health_check,
    _authenticated,
    _encrypt,
    _batch_encrypt,
    _audited_mutation,
    _audit_append,
    _login,
    _whoami_jwt,
    _whoami_api_key,
    _create_session,
    _create_session_replay,
    _get_session,
    _policy_check,
]


async def build_cases(ctx: BenchContext) -> list[Case]:
    """Run every builder in order (setup included) and return the cases."""
    return [await build(ctx) for build in BUILDERS]
