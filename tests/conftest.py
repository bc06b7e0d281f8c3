"""Session-wide fixtures: where PostgreSQL and Redis come from (tests/support/services.py),
a fresh database and Redis prefix per test, and the real server on 127.0.0.1:0."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2_grpc
from tptest.v1 import test_service_pb2_grpc
from trustplane.audit.v1 import audit_pb2_grpc
from trustplane.auth.v1 import auth_pb2_grpc
from trustplane.crypto.v1 import crypto_pb2_grpc

from server.app import App
from server.config import Config
from server.embedded import EmbeddedPostgres
from tests.support import databases, services
from tests.support.testing_service import TestServicer, registration
from tests.support.tokens import TestIdP


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis URL for the session; each test must use its own key prefix."""
    url = services.env_url("TEST_REDIS_URL", "REDIS_URL")
    if url:
        yield url
        return
    with services.redis_server() as started:
        yield started


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server URL for the session (tests create their own databases in it)."""
    url = services.env_url("TEST_DATABASE_URL", "DATABASE_URL")
    if url:
        yield url
        return
    embedded = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="tp-pg-")))
    try:
        started = embedded.start()
    except Exception as exc:
        services.unavailable(
            f"no TEST_DATABASE_URL/DATABASE_URL and embedded PostgreSQL failed to start: {exc}"
        )
    yield started
    embedded.stop()


@pytest.fixture(scope="session")
async def template_db(postgres_url: str) -> AsyncIterator[str]:
    """A migrated template database; each test's database is a copy of it."""
    try:
        name = await databases.create_template(postgres_url)
    except OSError as exc:
        services.unavailable(f"PostgreSQL at the configured URL is unreachable: {exc}")
    yield name
    await databases.drop(postgres_url, name)


@pytest.fixture
async def database_url(postgres_url: str, template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test only."""
    name = await databases.create_from_template(postgres_url, template_db)
    yield databases.with_database(postgres_url, name)
    await databases.drop(postgres_url, name)


@pytest.fixture
def redis_prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"


@pytest.fixture
def idp(tmp_path: Path) -> TestIdP:
    """An external issuer every test server trusts (TRUSTPLANE_TRUSTED_ISSUERS_FILE)."""
    directory = tmp_path / "idp"
    directory.mkdir()
    return TestIdP(directory)


@pytest.fixture
def make_config(
    tmp_path: Path, database_url: str, redis_url: str, redis_prefix: str, idp: TestIdP
) -> Callable[..., Config]:
    """Config for a test server; keyword arguments override environment variables."""

    def make(**overrides: str) -> Config:
        env = {
            "TRUSTPLANE_LISTEN": "127.0.0.1:0",
            "TRUSTPLANE_METRICS_LISTEN": "127.0.0.1:0",
            "TRUSTPLANE_DATA_DIR": str(tmp_path / "data"),
            "TRUSTPLANE_HEALTH_INTERVAL": "0.1",
            "TRUSTPLANE_GRACE_PERIOD": "5",
            "TRUSTPLANE_DB_POOL_MIN": "1",
            "TRUSTPLANE_DB_POOL_MAX": "4",
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "TRUSTPLANE_CACHE_PREFIX": redis_prefix,
            "TRUSTPLANE_TRUSTED_ISSUERS_FILE": str(idp.issuers_file),
            "TRUSTPLANE_RATE_LIMIT": "100000",
            "TRUSTPLANE_RATE_BURST": "10000",
        }
        env.update(overrides)
        return Config.from_environ({k: v for k, v in env.items() if v})

    return make


@dataclass
class Running:
    """A started server and a client channel to it."""

    app: App
    channel: grpc.aio.Channel
    servicer: TestServicer

    @property
    def test(self) -> test_service_pb2_grpc.TestServiceStub:
        return test_service_pb2_grpc.TestServiceStub(self.channel)

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel)

    @property
    def crypto(self) -> crypto_pb2_grpc.CryptoServiceStub:
        return crypto_pb2_grpc.CryptoServiceStub(self.channel)

    @property
    def auth(self) -> auth_pb2_grpc.AuthServiceStub:
        return auth_pb2_grpc.AuthServiceStub(self.channel)

    @property
    def audit(self) -> audit_pb2_grpc.AuditServiceStub:
        return audit_pb2_grpc.AuditServiceStub(self.channel)


@pytest.fixture
def start_server(make_config: Callable[..., Config]) -> Callable[..., ServerContext]:
    """Factory: `async with start_server(**env) as running:` starts the real server."""

    def start(
        config: Config | None = None, clock: Callable[[], float] | None = None, **overrides: str
    ) -> ServerContext:
        return ServerContext(config or make_config(**overrides), clock)

    return start


class ServerContext:
    def __init__(self, config: Config, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self.clock = clock
        self.servicer = TestServicer()

    async def __aenter__(self) -> Running:
        extra = [registration(self.servicer)]
        if self.clock is None:
            self._app = App(self.config, extra_services=extra)
        else:
            self._app = App(self.config, extra_services=extra, clock=self.clock)
        await self._app.__aenter__()
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{self._app.port}")
        return Running(self._app, self._channel, self.servicer)

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close(None)
        await self._app.stop()


@pytest.fixture
async def server(start_server: Callable[..., ServerContext]) -> AsyncIterator[Running]:
    """The real server with the test service, on 127.0.0.1:0."""
    async with start_server() as running:
        yield running
