"""The composition root: the only module that names concrete classes and wires them together.

`App` owns the server's lifetime as an async context manager: embedded PostgreSQL (when no
DATABASE_URL), migrations, the pool, the cache, the gRPC server with its interceptor chain,
health, reflection and metrics. Shutdown reverses it: health NOT_SERVING, stop accepting, drain
in-flight calls within the grace period, close the cache and the pool, stop PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from trustplane.audit.v1 import audit_pb2, audit_pb2_grpc
from trustplane.auth.v1 import auth_pb2, auth_pb2_grpc
from trustplane.crypto.v1 import crypto_pb2, crypto_pb2_grpc
from trustplane.policy.v1 import policy_pb2, policy_pb2_grpc
from trustplane.session.v1 import session_pb2, session_pb2_grpc

from interceptors.audit import AuditLayer
from interceptors.authenticate import ApiKeyVerifier, AuthenticateLayer, NoApiKeys
from interceptors.authorize import AuthorizeLayer, Authorizer
from interceptors.chain import Chain, Layer
from interceptors.idempotency import IdempotencyLayer
from interceptors.observe import ObserveLayer
from interceptors.rate_limit import RateLimitLayer
from interceptors.status import StatusLayer
from server import migrate
from server.audit.service import AuditLog
from server.audit.servicer import AuditServicer
from server.audit.store import PgAuditStore
from server.audit.subjects import Subjects
from server.auth.api_keys import ApiKeys
from server.auth.directory import PrincipalDirectory
from server.auth.mfa import Mfa
from server.auth.service import Authenticator
from server.auth.servicer import AuthServicer
from server.auth.store import PgAuthStore
from server.cache import Cache, open_cache
from server.config import Config
from server.crypto.hierarchy import RootKeys
from server.crypto.service import KeyManager
from server.crypto.servicer import CryptoServicer
from server.crypto.store import PgKeyStore
from server.db import Database
from server.embedded import EmbeddedPostgres
from server.health import HealthMonitor
from server.methods import MethodRegistry, public_spec
from server.metrics import Metrics, MetricsServer
from server.page_token import PageTokens
from server.permissions import RolePermissions
from server.policy.active import ActiveBundles, DecisionCache
from server.policy.authorizer import PolicyAuthorizer
from server.policy.service import PolicyEngine
from server.policy.servicer import PolicyServicer
from server.policy.store import PgPolicyStore
from server.revocation import RevocationList, stop_following
from server.session.service import SessionManager
from server.session.servicer import SessionServicer
from server.session.store import PgSessionStore
from server.tokens import LocalKeySource, TokenVerifier, TrustedIssuer, load_trusted_issuers

_log = logging.getLogger("trustplane.app")


@dataclasses.dataclass(frozen=True)
class ServiceRegistration:
    """A gRPC service to serve: its descriptor (for method options) and how to add it."""

    descriptor: descriptor.ServiceDescriptor
    servicer: Any
    add_to_server: Callable[[Any, Any], None]  # generated `add_*Servicer_to_server`


@dataclasses.dataclass(frozen=True)
class Security:
    """What the authentication and authorization layers consult."""

    tokens: TokenVerifier
    api_keys: ApiKeyVerifier
    revocations: RevocationList
    authorizer: Authorizer


def build_layers(
    config: Config,
    metrics: Metrics,
    cache: Cache,
    security: Security,
    audit: AuditLayer | None = None,
) -> list[Layer]:
    """The interceptor chain, outermost first. The order is pinned by a test; see
    docs/architecture.md#interceptor-order for why each layer sits where it does.
    `audit` is None only where no audit log exists (unit tests, TRUSTPLANE_AUDIT=off)."""
    return [
        # 1. observe: creates the CallState; counts and times every call, rejected ones too.
        ObserveLayer(metrics),
        # 2. audit: records every call and its final outcome; outside status to see it.
        *([audit] if audit is not None else []),
        # 3. status: domain errors -> google.rpc.Status; anything else -> INTERNAL.
        StatusLayer(),
        # 4. authenticate: Bearer JWT / API key -> ActorContext; public methods pass.
        AuthenticateLayer(security.tokens, security.api_keys, security.revocations),
        # 5. rate limit: per (tenant, principal, actor); needs the principal, so after 4.
        RateLimitLayer(cache, config.rate_limit, metrics.registry),
        # 6. authorize: the method's declared permission; denied callers still spent budget.
        AuthorizeLayer(security.authorizer),
        # 7. idempotency: after authn/authz so keys are per principal and replays re-checked.
        IdempotencyLayer(cache, config.idempotency, metrics.registry),
    ]


def build_security(
    config: Config,
    cache: Cache,
    own_keys: LocalKeySource,
    api_keys: ApiKeyVerifier | None = None,
    authorizer: Authorizer | None = None,
) -> Security:
    """Token verification (our own issuer + configured external ones), revocation, and the
    authorizer: the policy engine's in the server (`PolicyAuthorizer`: platform bundle, scopes,
    tenant restrictions); the built-in role table alone where no database exists (unit tests)."""
    issuers = [TrustedIssuer(config.auth.issuer, [config.auth.audience], own_keys)]
    if config.auth.trusted_issuers_file is not None:
        issuers += load_trusted_issuers(config.auth.trusted_issuers_file)
    return Security(
        tokens=TokenVerifier(
            issuers, leeway=config.auth.leeway, cache_size=config.auth.token_cache_size
        ),
        api_keys=api_keys or NoApiKeys(),
        revocations=RevocationList(
            cache,
            staleness=config.auth.revocation_staleness,
            max_token_ttl=config.auth.max_token_ttl,
        ),
        authorizer=authorizer or RolePermissions(),
    )


class GenericHandlersOnly:
    """Hands a server only the generic (by-name) handlers of a generated `add_*_to_server`.

    Since grpc 1.62 the generated code also registers every method ("registered methods").
    grpc.aio then keeps one pending request-call per registered method and its server loop
    waits on all of them again after every call, so each call costs time proportional to the
    number of methods — about 100 here, measured as two `asyncio.wait` over ~99 futures per call
    (a third of a Health/Check's server CPU). Generic handlers dispatch with one dictionary
    lookup instead, which is all we need.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """Deliberately ignored; see the class docstring."""


def build_services(app: App) -> list[ServiceRegistration]:
    """The trustplane services, wired to their domain objects."""
    assert app.crypto is not None
    assert app.audit is not None
    assert app.auth is not None
    assert app.api_keys is not None
    assert app.mfa is not None
    assert app.sessions is not None
    assert app.policy is not None
    return [
        ServiceRegistration(
            auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
            AuthServicer(app.auth, app.api_keys, app.credentials(), app.mfa),
            auth_pb2_grpc.add_AuthServiceServicer_to_server,
        ),
        ServiceRegistration(
            crypto_pb2.DESCRIPTOR.services_by_name["CryptoService"],
            CryptoServicer(app.crypto),
            crypto_pb2_grpc.add_CryptoServiceServicer_to_server,
        ),
        ServiceRegistration(
            audit_pb2.DESCRIPTOR.services_by_name["AuditService"],
            AuditServicer(app.audit),
            audit_pb2_grpc.add_AuditServiceServicer_to_server,
        ),
        ServiceRegistration(
            session_pb2.DESCRIPTOR.services_by_name["SessionService"],
            SessionServicer(app.sessions),
            session_pb2_grpc.add_SessionServiceServicer_to_server,
        ),
        ServiceRegistration(
            policy_pb2.DESCRIPTOR.services_by_name["PolicyService"],
            PolicyServicer(app.policy),
            policy_pb2_grpc.add_PolicyServiceServicer_to_server,
        ),
    ]


def infrastructure_methods() -> MethodRegistry:
    """Health and reflection: always on, public, recorded as access events."""
    registry = MethodRegistry()
    registry.add(public_spec("grpc.health.v1.Health", "Check"))
    registry.add(public_spec("grpc.health.v1.Health", "Watch", server_streaming=True))
    registry.add(
        public_spec(
            reflection.SERVICE_NAME,
            "ServerReflectionInfo",
            client_streaming=True,
            server_streaming=True,
        )
    )
    return registry


class App:
    """One server process. `async with App(config) as app:` serves until the block exits."""

    def __init__(
        self,
        config: Config,
        *,
        extra_services: Sequence[ServiceRegistration] = (),
        worker_index: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._extra_services = list(extra_services)
        self._services: list[ServiceRegistration] = []
        self._worker_index = worker_index
        self.clock = clock
        self.crypto: KeyManager | None = None
        self.auth: Authenticator | None = None
        self.api_keys: ApiKeys | None = None
        self.mfa: Mfa | None = None
        self.audit: AuditLog | None = None
        self.sessions: SessionManager | None = None
        self.policy: PolicyEngine | None = None
        self.policy_bundles: ActiveBundles | None = None
        self._principals: PrincipalDirectory | None = None
        self._audit_digest_key = b""
        self._background: list[asyncio.Task[None]] = []
        self.metrics = Metrics()
        self.port = 0
        self.metrics_port: int | None = None
        self.db: Database | None = None
        self.cache: Cache | None = None
        self._embedded: EmbeddedPostgres | None = None
        self._server: grpc.aio.Server | None = None
        self._health: HealthMonitor | None = None
        self._metrics_server: MetricsServer | None = None
        self._following: asyncio.Task[None] | None = None
        # The server's own token signing keys; the Auth service publishes them here.
        self.own_keys = LocalKeySource()
        self.security: Security | None = None

    async def __aenter__(self) -> App:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        dsn = self.config.database.url or await self._start_embedded()
        self.db = await Database.connect(dsn, self.config.database)
        await self._migrate(self.db)
        self.cache = open_cache(self.config.cache.url, self.config.cache.prefix)
        self.crypto = self._build_crypto(self.db, self.cache)
        self.own_keys = LocalKeySource(loader=self._token_jwks, on_removed=self._forget_tokens)
        auth_store = PgAuthStore(self.db)
        self.api_keys = ApiKeys(auth_store, self.crypto, clock=self.clock)
        await self.api_keys.start()
        self.policy_bundles = self._build_policy_bundles(self.db, self.cache)
        # Roles, attributes and the kill switch of every principal in a call, for decisions.
        self._principals = PrincipalDirectory(
            auth_store, ttl=self.config.policy.principal_cache_ttl, clock=self.clock
        )
        self.security = build_security(
            self.config,
            self.cache,
            self.own_keys,
            self.api_keys,
            PolicyAuthorizer(self.policy_bundles, self._principals),
        )
        self.mfa = Mfa(auth_store, self.crypto, self.cache, clock=self.clock)
        await self.mfa.start()
        self.audit = self._build_audit(self.db, self.crypto)
        await self.audit.start()
        self.sessions = SessionManager(
            PgSessionStore(self.db),
            auth_store,
            self.security.revocations,
            self.cache,
            self.config.session,
            self.crypto.page_tokens,
            audit=self.audit if self.config.audit.enabled else None,  # expiry, revocations
            clock=self.clock,
        )
        self.auth = Authenticator(
            auth_store,
            self.crypto,
            self.security.revocations,
            self.cache,
            self.config.auth,
            self.crypto.page_tokens,
            clock=self.clock,
            mfa=self.mfa,
            agent_sessions=self.sessions,
            permissions=self.security.authorizer,
        )
        await self.auth.start()
        await self.security.tokens.start()
        self._following = asyncio.create_task(self.security.revocations.follow())
        self.policy = self._build_policy(self.db, self.cache, self.policy_bundles, self.security)
        self._services = [*build_services(self), *self._extra_services]
        self._background += [
            asyncio.create_task(self.crypto.follow(), name="crypto-follow"),
            asyncio.create_task(
                self._every(self.config.crypto.sweep_interval, self.crypto.sweep),
                name="crypto-sweep",
            ),
            asyncio.create_task(
                self._every(self.config.crypto.sweep_interval, self.api_keys.flush),
                name="api-key-last-use",
            ),
            asyncio.create_task(  # rotations and destructions of the token key reach the verifier
                self._every(self.config.crypto.sweep_interval, self.own_keys.refresh),
                name="token-keys",
            ),
            asyncio.create_task(
                self._every(self.config.audit.checkpoint_interval, self.audit.checkpoints_due),
                name="audit-checkpoints",
            ),
            asyncio.create_task(
                self._every(self.config.audit.retention_interval, self.audit.expire),
                name="audit-retention",
            ),
            asyncio.create_task(
                self._every(self.config.session.sweep_interval, self.sessions.sweep),
                name="session-sweep",
            ),
            asyncio.create_task(self.policy_bundles.follow(), name="policy-follow"),
            asyncio.create_task(self.sessions.follow(), name="session-follow"),
        ]
        await self._start_grpc(self.db, self.cache, self.security)
        self._start_metrics()
        _log.info("serving", extra={"listen": self.address, "worker": self._worker_index})

    def credentials(self) -> AuthenticateLayer:
        """Verifies credentials passed in request bodies exactly as the chain does."""
        assert self.security is not None
        sec = self.security
        return AuthenticateLayer(sec.tokens, sec.api_keys, sec.revocations)

    def _forget_tokens(self) -> None:
        """A token signing version was destroyed: tokens verified with it must not be
        answered from the verified-token cache any more."""
        if self.security is not None:
            self.security.tokens.forget()

    async def _token_jwks(self) -> dict[str, Any]:
        """The public keys of our own access tokens, for the authenticate layer."""
        assert self.auth is not None
        return await self.auth.jwks()

    def _build_crypto(self, db: Database, cache: Cache) -> KeyManager:
        crypto = self.config.crypto
        roots = RootKeys.from_config(crypto.root_key, crypto.root_key_file, self.config.data_dir)
        return KeyManager(
            PgKeyStore(db), roots, cache, material_ttl=crypto.material_ttl, clock=self.clock
        )

    def _build_audit(self, db: Database, crypto: KeyManager) -> AuditLog:
        keys = self.config.crypto
        roots = RootKeys.from_config(keys.root_key, keys.root_key_file, self.config.data_dir)
        self._audit_digest_key = roots.derive(b"audit-request-digest")
        store = PgAuditStore(db)
        return AuditLog(
            store,
            crypto,
            self.config.audit,
            PageTokens(roots.derive(b"audit-page-tokens")),
            clock=self.clock,
            registry=self.metrics.registry,
            subjects=Subjects(crypto, store),
        )

    def _build_policy_bundles(self, db: Database, cache: Cache) -> ActiveBundles:
        policy = self.config.policy
        decisions = DecisionCache(policy.decision_cache_size, policy.decision_cache_ttl)
        return ActiveBundles(PgPolicyStore(db), cache, decisions, policy.bundle_cache_ttl)

    def _build_policy(
        self, db: Database, cache: Cache, bundles: ActiveBundles, security: Security
    ) -> PolicyEngine:
        assert self.crypto is not None
        assert self.sessions is not None  # approval tokens are redeemed by the Session service
        return PolicyEngine(
            PgPolicyStore(db),
            bundles,
            cache,
            security.authorizer,
            self.config.policy,
            self.crypto.page_tokens,
            redeemer=self.sessions,
            sessions=self.sessions,  # the labels and state a decision's session really has
            principals=self._principals,
            clock=self.clock,
        )

    def _audit_layer(self) -> AuditLayer | None:
        if self.audit is None or not self.config.audit.enabled:
            return None
        return AuditLayer(self.audit, self._audit_digest_key, self.clock)

    @staticmethod
    async def _every(interval: float, job: Callable[[], Awaitable[None]]) -> None:
        """Run `job` every `interval` seconds; a failure is logged and retried next time."""
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except Exception:
                _log.exception("background job failed", extra={"job": job.__qualname__})

    @property
    def is_embedded(self) -> bool:
        """Whether this process started its own PostgreSQL (the zero-setup default)."""
        return self._embedded is not None

    @property
    def address(self) -> str:
        return f"{self.config.server.listen.host}:{self.port}"

    async def _start_embedded(self) -> str:
        self._embedded = EmbeddedPostgres(self.config.data_dir)
        dsn = await asyncio.to_thread(self._embedded.start)
        _log.info("embedded PostgreSQL started", extra={"port": self._embedded.port})
        return dsn

    async def _migrate(self, db: Database) -> None:
        migrations = migrate.load()
        async with db.session() as conn:  # migrate holds a session advisory lock
            if self.config.database.migrate == "auto":
                applied = await migrate.migrate(conn, migrations)
                if applied:
                    _log.info("migrated", extra={"applied": [m.version for m in applied]})
            elif pending := await migrate.check(conn, migrations):
                raise migrate.MigrationError(
                    f"{len(pending)} migration(s) pending; run `python -m server migrate`"
                )

    async def _start_grpc(self, db: Database, cache: Cache, security: Security) -> None:
        registry = infrastructure_methods()
        for service in self._services:
            registry.add_service(service.descriptor)
        registry.require_permissions()
        layers = build_layers(self.config, self.metrics, cache, security, self._audit_layer())
        self.chain = Chain(layers, registry)
        server = self._server = grpc.aio.server(
            interceptors=[self.chain], options=self._grpc_options()
        )
        generic = GenericHandlersOnly(server)
        for service in self._services:
            service.add_to_server(service.servicer, generic)
        names = [s.descriptor.full_name for s in self._services]
        self._health = HealthMonitor(
            names,
            lambda: db.ping(timeout=max(self.config.database.health_interval, 1.0)),
            self.config.database.health_interval,
            on_change=self.metrics.healthy.set,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health.servicer, generic)
        reflection.enable_server_reflection(
            (
                *names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        self.metrics.add_gauges("trustplane_db_pool_connections", "Pool connections.", db.stats)
        self.metrics.add_gauges(
            "trustplane_audit_queue",
            "Audit entries waiting for the writer.",
            lambda: {"depth": self.audit.depth() if self.audit else 0},
        )
        if self.policy_bundles is not None:
            self.metrics.add_gauges(
                "trustplane_policy_decision_cache",
                "Policy decision cache: hits, misses, size.",
                self.policy_bundles.decisions.stats,
            )
        self.metrics.add_gauges(
            "trustplane_token_cache",
            "Verified-token cache: hits, misses, size.",
            security.tokens.stats,
        )
        self.port = self._bind(server)
        await self._health.start()
        await server.start()

    def _grpc_options(self) -> list[tuple[str, Any]]:
        limit = self.config.server.max_message_bytes
        return [
            # Only share the port when we fork workers on purpose: a second `make run` must
            # fail to bind instead of silently taking half the traffic.
            ("grpc.so_reuseport", 1 if self.config.server.workers > 1 else 0),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]

    def _bind(self, server: grpc.aio.Server) -> int:
        listen = str(self.config.server.listen)
        tls = self.config.server.tls
        if tls is None:
            port = server.add_insecure_port(listen)
        else:
            credentials = grpc.ssl_server_credentials(
                [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
                root_certificates=tls.client_ca_file.read_bytes() if tls.client_ca_file else None,
                require_client_auth=tls.client_ca_file is not None,
            )
            port = server.add_secure_port(listen, credentials)
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
        return port

    def _start_metrics(self) -> None:
        address = self.config.observability.metrics_listen
        if address is not None:
            server = MetricsServer(self.metrics, address.with_port_offset(self._worker_index))
            self._metrics_server = server
            self.metrics_port = server.port

    async def _flush_coalesced(self) -> None:
        """Write what was being coalesced in memory (key usage, last-use times), best effort."""
        if self.db is None:
            return
        if self.crypto is not None:
            with contextlib.suppress(Exception):
                await self.crypto.flush_usage()
        if self.api_keys is not None:
            with contextlib.suppress(Exception):
                await self.api_keys.flush()

    async def stop(self) -> None:
        """Graceful shutdown; safe to call on a partly started app, and twice."""
        health, self._health = self._health, None
        if health is not None:
            await health.shutdown()
        if self.sessions is not None:
            self.sessions.close()  # watch streams end now rather than at the grace deadline
        if self.audit is not None:
            self.audit.stop_following()  # followed exports too
        server, self._server = self._server, None
        if server is not None:
            await server.stop(self.config.server.grace_period)
        following, self._following = self._following, None
        if following is not None:
            await stop_following(following)
        background, self._background = self._background, []
        for task in background:
            await stop_following(task)
        await self._flush_coalesced()
        audit, self.audit = self.audit, None
        if audit is not None:
            await audit.close()  # after the server stopped: every answered call is queued
        cache, self.cache = self.cache, None
        if cache is not None:
            await cache.close()
        db, self.db = self.db, None
        if db is not None:
            await db.close()
        metrics_server, self._metrics_server = self._metrics_server, None
        if metrics_server is not None:
            metrics_server.close()
        embedded, self._embedded = self._embedded, None
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        _log.info("stopped", extra={"worker": self._worker_index})
