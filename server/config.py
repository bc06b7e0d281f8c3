"""Configuration: read once from an (injectable) environment into frozen dataclasses.

Every variable is listed in docs/config.md. A bad value stops start-up with a `ConfigError`
that names the variable; secrets (URLs with passwords) are kept out of `repr`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the variable."""


@dataclass(frozen=True)
class Address:
    """A `host:port` to listen on; port 0 asks the OS for a free one."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def with_port_offset(self, offset: int) -> Address:
        return Address(self.host, self.port + offset if self.port else 0)


@dataclass(frozen=True)
class TlsConfig:
    """Server TLS; with `client_ca_file` set, clients must present a certificate (mTLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


@dataclass(frozen=True)
class ServerConfig:
    listen: Address = Address("127.0.0.1", 50051)
    workers: int = 1
    grace_period: float = 10.0
    max_message_bytes: int = 4 * 1024 * 1024
    tls: TlsConfig | None = None


@dataclass(frozen=True)
class DatabaseConfig:
    # None: start the embedded PostgreSQL under `data_dir`.
    url: str | None = field(default=None, repr=False)
    pool_min: int = 2
    pool_max: int = 10
    health_interval: float = 1.0
    statement_timeout: float = 5.0
    # "auto": apply pending migrations at start-up; "check": refuse to start if any are pending.
    migrate: str = "auto"


@dataclass(frozen=True)
class CacheConfig:
    # None: the in-process backend (single worker only).
    url: str | None = field(default=None, repr=False)
    prefix: str = "tp:"


@dataclass(frozen=True)
class AuthConfig:
    """Token verification (the authenticate layer)."""

    # `iss` and `aud` of the tokens this server issues (the Auth service signs them).
    issuer: str = "trustplane"
    audience: str = "trustplane"
    # JSON file listing trusted external issuers (Keycloak-style IdPs); see docs/authentication.md.
    trusted_issuers_file: Path | None = None
    leeway: float = 30.0
    token_cache_size: int = 10_000
    # How long a "not revoked" answer may be reused in-process before Redis is asked again.
    revocation_staleness: float = 1.0
    # Longest lifetime of any token we accept; bounds how long deny-list entries are kept.
    max_token_ttl: float = 86_400.0
    access_token_ttl: float = 900.0
    refresh_token_ttl: float = 30 * 86_400.0
    # Login attempts per account per window (per client address: four times as many); once
    # they are used up the account (address) is locked for one window, then two, four, … up to
    # an hour.
    login_max_failures: int = 5
    login_window: float = 60.0
    # RFC 8693 delegated tokens: lifetime and the longest `act` chain.
    delegation_ttl: float = 300.0
    delegation_max_depth: int = 3
    invitation_ttl: float = 7 * 86_400.0
    # Automatic rotation period of the access-token signing key (None: rotated by hand only).
    token_key_rotation: float | None = 30 * 86_400.0


@dataclass(frozen=True)
class RateLimitConfig:
    """Per (tenant, principal, actor) request rate; 0 disables."""

    per_minute: int = 100
    burst: int = 50


@dataclass(frozen=True)
class IdempotencyConfig:
    ttl: float = 86_400.0  # how long a completed outcome is replayed
    lease: float = 30.0  # how long a running call holds its key if its process dies
    max_wait: float = 2.0  # how long a duplicate waits for the first call before ABORTED


@dataclass(frozen=True)
class CryptoConfig:
    """The key hierarchy's root keys and the key caches (docs/crypto.md)."""

    # Base64 root keys, first = primary; None: TRUSTPLANE_ROOT_KEY_FILE or <data_dir>/root.key.
    root_key: str | None = field(default=None, repr=False)
    root_key_file: Path | None = None
    material_ttl: float = 60.0
    sweep_interval: float = 10.0


@dataclass(frozen=True)
class AuditConfig:
    """The audit log's writer, checkpoints and retention (docs/audit.md)."""

    # Off only for benchmarks that measure the audit layer's cost; never in production.
    enabled: bool = True
    queue_size: int = 10_000  # access entries waiting for the writer; full = back-pressure
    batch_max: int = 256  # entries per group commit
    pipeline: int = 2  # group commits in flight at once (the next is sent before one is answered)
    linger: float = 0.001  # seconds the writer waits for more entries before a short batch
    # ... when the batch holds only access entries (nobody waits for them): fewer, larger
    # commits; a durable entry or a full batch ends the wait at once.
    access_linger: float = 0.02
    checkpoint_interval: float = 10.0  # seconds between automatic signed checkpoints
    checkpoint_entries: int = 10_000  # also sign one whenever a log passes a multiple of this
    retention_days: int = 365  # default per tenant; bodies of older entries are removed
    retention_interval: float = 3600.0  # seconds between retention runs
    # A full queue makes access-class calls wait ("block") or drops their entries and records a
    # gap entry with the count ("drop"); security-class entries are never dropped.
    overflow: str = "block"
    # A followed export (ExportEntries `follow`) sends at most one checkpoint this often, and
    # polls for other processes' appends at this period.
    tail_interval: float = 1.0


@dataclass(frozen=True)
class SessionConfig:
    """Agent sessions and approvals: TTLs, the sweeper, retention (docs/session.md)."""

    default_ttl: float = 3600.0  # a session's TTL when CreateSession sends none
    max_ttl: float = 7 * 86_400.0  # the longest TTL CreateSession accepts
    retention_days: float = 7.0  # ended sessions are purged this long after they end
    sweep_interval: float = 10.0  # seconds between sweeps (expiry, revocation retries, purge)
    approval_default_ttl: float = 900.0  # an approval's TTL when RequestApproval sends none
    approval_max_ttl: float = 86_400.0
    watch_poll: float = 5.0  # watchers re-read PostgreSQL at least this often
    # Seconds a session read (GetSession, policy decisions) is reused in-process; changes
    # invalidate it at once (pub/sub), so this only bounds staleness when a message is lost.
    # 0: no cache.
    read_ttl: float = 1.0


@dataclass(frozen=True)
class PolicyConfig:
    """The Policy service and the authorizer (docs/policy.md)."""

    max_checks: int = 100  # resources x actions per Check
    max_filter_candidates: int = 1000  # candidates per Filter
    max_delegates: int = 8  # principals of a delegation chain in Check, Explain and Filter
    decision_cache_size: int = 100_000  # decisions kept in-process; 0 turns the cache off
    decision_cache_ttl: float = 60.0  # seconds a cached decision is reused
    # Seconds a tenant's active version is trusted in-process without a pub/sub message; a
    # backstop for lost invalidation messages (activation normally propagates at once).
    bundle_cache_ttl: float = 30.0
    # How long a Check's quota receipt (per request_id) is kept: retries within it never
    # charge twice.
    receipt_ttl: float = 86_400.0
    # Seconds the roles, attributes and disabled flag of a principal (read from the Auth store
    # for delegates and callers) are reused in-process; bounds how long a role change or the
    # kill switch takes to reach decisions. 0: read every time.
    principal_cache_ttl: float = 1.0


@dataclass(frozen=True)
class ObservabilityConfig:
    metrics_listen: Address | None = Address("127.0.0.1", 9464)
    log_level: str = "INFO"
    log_format: str = "json"


@dataclass(frozen=True)
class Config:
    """Everything the server needs to start."""

    data_dir: Path = Path(".trustplane")
    server: ServerConfig = ServerConfig()
    database: DatabaseConfig = DatabaseConfig()
    cache: CacheConfig = CacheConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    auth: AuthConfig = AuthConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    idempotency: IdempotencyConfig = IdempotencyConfig()
    crypto: CryptoConfig = CryptoConfig()
    audit: AuditConfig = AuditConfig()
    session: SessionConfig = SessionConfig()
    policy: PolicyConfig = PolicyConfig()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Build the configuration from `environ` (default: `os.environ`)."""
        env = _Env(os.environ if environ is None else environ)
        return cls(
            data_dir=Path(env.get("TRUSTPLANE_DATA_DIR", ".trustplane", _non_empty)),
            server=_server(env),
            database=_database(env),
            cache=CacheConfig(
                url=env.optional("REDIS_URL", _redis_url),
                prefix=env.get("TRUSTPLANE_CACHE_PREFIX", "tp:", _non_empty),
            ),
            observability=_observability(env),
            auth=_auth(env),
            crypto=CryptoConfig(
                root_key=env.optional("TRUSTPLANE_ROOT_KEY", _root_keys),
                root_key_file=env.optional("TRUSTPLANE_ROOT_KEY_FILE", _existing_file),
                material_ttl=env.get("TRUSTPLANE_KEY_CACHE_TTL", "60", _float_range(0.0, 3600.0)),
                sweep_interval=env.get(
                    "TRUSTPLANE_CRYPTO_SWEEP_INTERVAL", "10", _float_range(0.05, 3600.0)
                ),
            ),
            rate_limit=_rate_limit(env),
            audit=_audit(env),
            session=_session(env),
            policy=_policy(env),
            idempotency=IdempotencyConfig(
                ttl=env.get(
                    "TRUSTPLANE_IDEMPOTENCY_TTL", "86400", _float_range(60.0, 30 * 86400.0)
                ),
                lease=env.get("TRUSTPLANE_IDEMPOTENCY_LEASE", "30", _float_range(1.0, 3600.0)),
                max_wait=env.get("TRUSTPLANE_IDEMPOTENCY_WAIT", "2", _float_range(0.0, 30.0)),
            ),
        )


def _server(env: _Env) -> ServerConfig:
    return ServerConfig(
        listen=env.get("TRUSTPLANE_LISTEN", "127.0.0.1:50051", parse_address),
        workers=env.get("TRUSTPLANE_WORKERS", "1", _int_range(1, 64)),
        grace_period=env.get("TRUSTPLANE_GRACE_PERIOD", "10", _float_range(0.0, 300.0)),
        max_message_bytes=env.get(
            "TRUSTPLANE_MAX_MESSAGE_BYTES", str(4 * 1024 * 1024), _int_range(1024, 64 << 20)
        ),
        tls=_tls(env),
    )


def _database(env: _Env) -> DatabaseConfig:
    pool_min = env.get("TRUSTPLANE_DB_POOL_MIN", "2", _int_range(0, 1000))
    pool_max = env.get("TRUSTPLANE_DB_POOL_MAX", "10", _int_range(1, 1000))
    if pool_max < pool_min:
        raise ConfigError("TRUSTPLANE_DB_POOL_MAX: must be >= TRUSTPLANE_DB_POOL_MIN")
    return DatabaseConfig(
        url=env.optional("DATABASE_URL", _postgres_url),
        pool_min=pool_min,
        pool_max=pool_max,
        health_interval=env.get("TRUSTPLANE_HEALTH_INTERVAL", "1", _float_range(0.05, 60.0)),
        statement_timeout=env.get("TRUSTPLANE_DB_TIMEOUT", "5", _float_range(0.01, 600.0)),
        migrate=env.get("TRUSTPLANE_MIGRATE", "auto", _choice("auto", "check")),
    )


def _session(env: _Env) -> SessionConfig:
    day = 86_400.0
    config = SessionConfig(
        default_ttl=env.get("TRUSTPLANE_SESSION_DEFAULT_TTL", "3600", _float_range(1.0, 365 * day)),
        max_ttl=env.get("TRUSTPLANE_SESSION_MAX_TTL", "604800", _float_range(1.0, 365 * day)),
        retention_days=env.get("TRUSTPLANE_SESSION_RETENTION_DAYS", "7", _float_range(0.0, 3650.0)),
        sweep_interval=env.get(
            "TRUSTPLANE_SESSION_SWEEP_INTERVAL", "10", _float_range(0.05, 3600.0)
        ),
        approval_default_ttl=env.get(
            "TRUSTPLANE_APPROVAL_DEFAULT_TTL", "900", _float_range(1.0, 30 * day)
        ),
        approval_max_ttl=env.get(
            "TRUSTPLANE_APPROVAL_MAX_TTL", "86400", _float_range(1.0, 30 * day)
        ),
        watch_poll=env.get("TRUSTPLANE_SESSION_WATCH_POLL", "5", _float_range(0.05, 60.0)),
        read_ttl=env.get("TRUSTPLANE_SESSION_READ_TTL", "1", _float_range(0.0, 60.0)),
    )
    if env.optional("TRUSTPLANE_SESSION_POLICY_READ_TTL", str) is not None:
        # Renamed when GetSession joined policy decisions on the shared read: a setting left
        # under the old name would otherwise be ignored without a word.
        raise ConfigError(
            "TRUSTPLANE_SESSION_POLICY_READ_TTL: renamed to TRUSTPLANE_SESSION_READ_TTL"
        )
    if config.default_ttl > config.max_ttl:
        raise ConfigError("TRUSTPLANE_SESSION_DEFAULT_TTL: must be <= TRUSTPLANE_SESSION_MAX_TTL")
    if config.approval_default_ttl > config.approval_max_ttl:
        raise ConfigError("TRUSTPLANE_APPROVAL_DEFAULT_TTL: must be <= TRUSTPLANE_APPROVAL_MAX_TTL")
    return config


def _observability(env: _Env) -> ObservabilityConfig:
    return ObservabilityConfig(
        metrics_listen=env.get("TRUSTPLANE_METRICS_LISTEN", "127.0.0.1:9464", _optional_address),
        log_level=env.get("TRUSTPLANE_LOG_LEVEL", "INFO", _log_level),
        log_format=env.get("TRUSTPLANE_LOG_FORMAT", "json", _choice("json", "text")),
    )


def _auth(env: _Env) -> AuthConfig:
    return AuthConfig(
        issuer=env.get("TRUSTPLANE_ISSUER", "trustplane", _non_empty),
        audience=env.get("TRUSTPLANE_AUDIENCE", "trustplane", _non_empty),
        trusted_issuers_file=env.optional("TRUSTPLANE_TRUSTED_ISSUERS_FILE", _existing_file),
        leeway=env.get("TRUSTPLANE_JWT_LEEWAY", "30", _float_range(0.0, 60.0)),
        token_cache_size=env.get("TRUSTPLANE_TOKEN_CACHE_SIZE", "10000", _int_range(0, 10**7)),
        revocation_staleness=env.get(
            "TRUSTPLANE_REVOCATION_STALENESS", "1", _float_range(0.0, 30.0)
        ),
        max_token_ttl=env.get(
            "TRUSTPLANE_MAX_TOKEN_TTL", "86400", _float_range(60.0, 30 * 86400.0)
        ),
        access_token_ttl=env.get("TRUSTPLANE_ACCESS_TOKEN_TTL", "900", _float_range(60.0, 86400.0)),
        refresh_token_ttl=env.get(
            "TRUSTPLANE_REFRESH_TOKEN_TTL", str(30 * 86400), _float_range(300.0, 365 * 86400.0)
        ),
        login_max_failures=env.get("TRUSTPLANE_LOGIN_MAX_ATTEMPTS", "5", _int_range(1, 1000)),
        login_window=env.get("TRUSTPLANE_LOGIN_WINDOW", "60", _float_range(1.0, 3600.0)),
        delegation_ttl=env.get("TRUSTPLANE_DELEGATION_TTL", "300", _float_range(30.0, 3600.0)),
        delegation_max_depth=env.get("TRUSTPLANE_DELEGATION_MAX_DEPTH", "3", _int_range(1, 8)),
        invitation_ttl=env.get(
            "TRUSTPLANE_INVITATION_TTL", str(7 * 86400), _float_range(60.0, 90 * 86400.0)
        ),
        token_key_rotation=env.get(
            "TRUSTPLANE_TOKEN_KEY_ROTATION",
            str(30 * 86400),
            _period_or_off(86400.0, 3650 * 86400.0),
        ),
    )


def _rate_limit(env: _Env) -> RateLimitConfig:
    return RateLimitConfig(
        per_minute=env.get("TRUSTPLANE_RATE_LIMIT", "100", _int_range(0, 10**9)),
        burst=env.get("TRUSTPLANE_RATE_BURST", "50", _int_range(1, 10**9)),
    )


def _audit(env: _Env) -> AuditConfig:
    return AuditConfig(
        enabled=env.get("TRUSTPLANE_AUDIT", "on", _choice("on", "off")) == "on",
        queue_size=env.get("TRUSTPLANE_AUDIT_QUEUE_SIZE", "10000", _int_range(1, 10**7)),
        batch_max=env.get("TRUSTPLANE_AUDIT_BATCH_MAX", "256", _int_range(1, 256)),
        pipeline=env.get("TRUSTPLANE_AUDIT_PIPELINE", "2", _int_range(1, 8)),
        linger=env.get("TRUSTPLANE_AUDIT_LINGER", "0.001", _float_range(0.0, 0.1)),
        access_linger=env.get("TRUSTPLANE_AUDIT_ACCESS_LINGER", "0.02", _float_range(0.0, 0.1)),
        checkpoint_interval=env.get(
            "TRUSTPLANE_AUDIT_CHECKPOINT_INTERVAL", "10", _float_range(0.05, 86400.0)
        ),
        checkpoint_entries=env.get(
            "TRUSTPLANE_AUDIT_CHECKPOINT_ENTRIES", "10000", _int_range(0, 10**9)
        ),
        retention_days=env.get("TRUSTPLANE_AUDIT_RETENTION_DAYS", "365", _int_range(1, 3650)),
        retention_interval=env.get(
            "TRUSTPLANE_AUDIT_RETENTION_INTERVAL", "3600", _float_range(0.05, 86400.0)
        ),
        overflow=env.get("TRUSTPLANE_AUDIT_OVERFLOW", "block", _choice("block", "drop")),
        tail_interval=env.get("TRUSTPLANE_AUDIT_TAIL_INTERVAL", "1", _float_range(0.05, 60.0)),
    )


def _policy(env: _Env) -> PolicyConfig:
    return PolicyConfig(
        max_checks=env.get("TRUSTPLANE_POLICY_MAX_CHECKS", "100", _int_range(1, 10_000)),
        max_filter_candidates=env.get(
            "TRUSTPLANE_POLICY_MAX_FILTER_CANDIDATES", "1000", _int_range(1, 100_000)
        ),
        max_delegates=env.get("TRUSTPLANE_POLICY_MAX_DELEGATES", "8", _int_range(0, 64)),
        decision_cache_size=env.get(
            "TRUSTPLANE_POLICY_DECISION_CACHE_SIZE", "100000", _int_range(0, 10**7)
        ),
        decision_cache_ttl=env.get(
            "TRUSTPLANE_POLICY_DECISION_CACHE_TTL", "60", _float_range(0.001, 86400.0)
        ),
        bundle_cache_ttl=env.get(
            "TRUSTPLANE_POLICY_BUNDLE_CACHE_TTL", "30", _float_range(0.001, 3600.0)
        ),
        receipt_ttl=env.get(
            "TRUSTPLANE_POLICY_RECEIPT_TTL", "86400", _float_range(60.0, 30 * 86400.0)
        ),
        principal_cache_ttl=env.get(
            "TRUSTPLANE_POLICY_PRINCIPAL_CACHE_TTL", "1", _float_range(0.0, 60.0)
        ),
    )


def _tls(env: _Env) -> TlsConfig | None:
    cert = env.optional("TRUSTPLANE_TLS_CERT", _existing_file)
    key = env.optional("TRUSTPLANE_TLS_KEY", _existing_file)
    client_ca = env.optional("TRUSTPLANE_TLS_CLIENT_CA", _existing_file)
    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigError("TRUSTPLANE_TLS_CLIENT_CA: needs TRUSTPLANE_TLS_CERT and _KEY")
        return None
    if cert is None or key is None:
        raise ConfigError("TRUSTPLANE_TLS_CERT / TRUSTPLANE_TLS_KEY: set both or neither")
    return TlsConfig(cert, key, client_ca)


class _Env:
    """Reads variables and wraps parse failures in a ConfigError naming the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def get(self, name: str, default: str, parse: Callable[[str], T]) -> T:
        return self._parse(name, self._environ.get(name, default), parse)

    def optional(self, name: str, parse: Callable[[str], T]) -> T | None:
        raw = self._environ.get(name, "")
        return self._parse(name, raw, parse) if raw.strip() else None

    @staticmethod
    def _parse(name: str, raw: str, parse: Callable[[str], T]) -> T:
        try:
            return parse(raw.strip())
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{name}: {exc}") from None


# --- parsers: each raises ValueError with a message that never repeats a secret -----------


def parse_address(raw: str) -> Address:
    """`host:port`, `[v6]:port` or `:port` (all interfaces)."""
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {raw!r}")
    host = host.strip("[]") or "0.0.0.0"
    number = int(port)
    if number > 65535:
        raise ValueError(f"port {number} is out of range 0-65535")
    return Address(host, number)


def _optional_address(raw: str) -> Address | None:
    return None if raw.lower() in {"", "off", "none", "disabled"} else parse_address(raw)


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if not low <= value <= high:
            raise ValueError(f"{value} is out of range {low}-{high}")
        return value

    return parse


def _float_range(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw)
        if not low <= value <= high:
            raise ValueError(f"{value} is out of range {low}-{high}")
        return value

    return parse


def _period_or_off(low: float, high: float) -> Callable[[str], float | None]:
    """Seconds between `low` and `high`, or 0 for "off" (None)."""
    within = _float_range(low, high)

    def parse(raw: str) -> float | None:
        return None if raw.strip() in ("0", "0.0") else within(raw)

    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {raw!r}")
        return raw.lower()

    return parse


def _log_level(raw: str) -> str:
    level = raw.upper()
    if not isinstance(logging.getLevelNamesMapping().get(level), int):
        raise ValueError(f"unknown log level {raw!r}")
    return level


def _non_empty(raw: str) -> str:
    if not raw:
        raise ValueError("must not be empty")
    return raw


def _postgres_url(raw: str) -> str:
    if not raw.startswith(("postgres://", "postgresql://")):
        raise ValueError("expected a postgresql:// URL")
    return raw


def _redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return raw


def _root_keys(raw: str) -> str:
    """Validate without echoing: base64 32-byte keys separated by commas."""
    from server.crypto.hierarchy import parse_keys  # noqa: PLC0415 - avoid a config->crypto cycle

    try:
        parse_keys(raw, "value")
    except ValueError as exc:
        raise ValueError(str(exc).replace("value: ", "")) from None
    return raw


def _existing_file(raw: str) -> Path:
    path = Path(raw)
    if not path.is_file():
        raise ValueError(f"no such file: {raw}")
    return path
