"""Configuration: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import Address, Config, ConfigError


def test_defaults():
    config = Config.from_environ({})
    assert config.server.listen == Address("127.0.0.1", 50051)
    assert config.data_dir == Path(".trustplane")
    assert config.database.url is None
    assert config.cache.url is None
    assert config.server.workers == 1
    assert config.observability.metrics_listen == Address("127.0.0.1", 9464)
    assert (config.audit.retention_interval, config.audit.tail_interval) == (3600.0, 1.0)


def test_values_are_parsed():
    config = Config.from_environ(
        {
            "TRUSTPLANE_LISTEN": "[::1]:6000",
            "TRUSTPLANE_METRICS_LISTEN": "off",
            "TRUSTPLANE_GRACE_PERIOD": "2.5",
            "DATABASE_URL": "postgresql://u:pw@h/db",
            "REDIS_URL": "redis://:pw@h:6379/1",
            "TRUSTPLANE_LOG_LEVEL": "debug",
        }
    )
    assert config.server.listen == Address("::1", 6000)
    assert str(config.server.listen) == "[::1]:6000"
    assert config.observability.metrics_listen is None
    assert config.server.grace_period == 2.5
    assert config.observability.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("TRUSTPLANE_LISTEN", "localhost", "expected host:port"),
        ("TRUSTPLANE_LISTEN", "127.0.0.1:70000", "out of range"),
        ("TRUSTPLANE_WORKERS", "0", "out of range"),
        ("TRUSTPLANE_WORKERS", "two", "invalid literal"),
        ("TRUSTPLANE_GRACE_PERIOD", "-1", "out of range"),
        ("TRUSTPLANE_LOG_LEVEL", "LOUD", "unknown log level"),
        ("TRUSTPLANE_LOG_FORMAT", "xml", "expected one of"),
        ("DATABASE_URL", "mysql://x", "postgresql://"),
        ("REDIS_URL", "http://x", "redis://"),
        ("TRUSTPLANE_TLS_CERT", "/nonexistent.pem", "no such file"),
        ("TRUSTPLANE_MIGRATE", "sometimes", "expected one of"),
        ("TRUSTPLANE_AUDIT_RETENTION_INTERVAL", "0", "out of range"),
        ("TRUSTPLANE_AUDIT_TAIL_INTERVAL", "61", "out of range"),
        ("TRUSTPLANE_AUDIT_PIPELINE", "9", "out of range"),
        ("TRUSTPLANE_SESSION_POLICY_READ_TTL", "5", "renamed to TRUSTPLANE_SESSION_READ_TTL"),
    ],
)
def test_bad_values_name_the_variable(name, value, fragment):
    with pytest.raises(ConfigError) as error:
        Config.from_environ({name: value})
    assert str(error.value).startswith(f"{name}: ")
    assert fragment in str(error.value)


def test_pool_bounds_are_consistent():
    with pytest.raises(ConfigError, match="TRUSTPLANE_DB_POOL_MAX"):
        Config.from_environ({"TRUSTPLANE_DB_POOL_MIN": "5", "TRUSTPLANE_DB_POOL_MAX": "2"})


def test_tls_needs_both_files(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="set both or neither"):
        Config.from_environ({"TRUSTPLANE_TLS_CERT": str(cert)})


def test_secrets_are_not_in_repr():
    config = Config.from_environ(
        {"DATABASE_URL": "postgresql://u:s3cret@h/db", "REDIS_URL": "redis://:s3cret@h"}
    )
    assert "s3cret" not in repr(config)


def test_bad_database_url_error_does_not_echo_it():
    with pytest.raises(ConfigError) as error:
        Config.from_environ({"DATABASE_URL": "mysql://u:s3cret@h/db"})
    assert "s3cret" not in str(error.value)


def test_config_is_frozen():
    config = Config.from_environ({})
    with pytest.raises(AttributeError):
        config.data_dir = Path("/elsewhere")  # type: ignore[misc]


def test_token_key_rotation_period():
    assert Config.from_environ({}).auth.token_key_rotation == 30 * 86400
    assert (
        Config.from_environ({"TRUSTPLANE_TOKEN_KEY_ROTATION": "0"}).auth.token_key_rotation is None
    )
    week = Config.from_environ({"TRUSTPLANE_TOKEN_KEY_ROTATION": "604800"})
    assert week.auth.token_key_rotation == 604800
    with pytest.raises(ConfigError, match="TRUSTPLANE_TOKEN_KEY_ROTATION"):
        Config.from_environ({"TRUSTPLANE_TOKEN_KEY_ROTATION": "3600"})  # under a day
