"""The Session section of the configuration: defaults, parsing, consistency."""

from __future__ import annotations

import pytest

from server.config import Config, ConfigError


def test_session_defaults():
    session = Config.from_environ({}).session
    assert (session.default_ttl, session.max_ttl) == (3600.0, 7 * 86_400.0)
    assert (session.retention_days, session.sweep_interval) == (7.0, 10.0)
    assert (session.approval_default_ttl, session.approval_max_ttl) == (900.0, 86_400.0)


def test_session_values_are_parsed():
    session = Config.from_environ(
        {
            "TRUSTPLANE_SESSION_DEFAULT_TTL": "60",
            "TRUSTPLANE_SESSION_MAX_TTL": "120",
            "TRUSTPLANE_SESSION_RETENTION_DAYS": "0.5",
            "TRUSTPLANE_SESSION_WATCH_POLL": "0.2",
        }
    ).session
    assert (session.default_ttl, session.max_ttl, session.retention_days) == (60.0, 120.0, 0.5)
    assert session.watch_poll == 0.2


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        (
            {"TRUSTPLANE_SESSION_DEFAULT_TTL": "7200", "TRUSTPLANE_SESSION_MAX_TTL": "3600"},
            "TRUSTPLANE_SESSION_DEFAULT_TTL",
        ),
        ({"TRUSTPLANE_APPROVAL_DEFAULT_TTL": "90000"}, "TRUSTPLANE_APPROVAL_DEFAULT_TTL"),
        ({"TRUSTPLANE_SESSION_RETENTION_DAYS": "-1"}, "TRUSTPLANE_SESSION_RETENTION_DAYS"),
        ({"TRUSTPLANE_SESSION_SWEEP_INTERVAL": "0"}, "TRUSTPLANE_SESSION_SWEEP_INTERVAL"),
        ({"TRUSTPLANE_SESSION_WATCH_POLL": "soon"}, "TRUSTPLANE_SESSION_WATCH_POLL"),
    ],
)
def test_bad_session_values_name_the_variable(env, variable):
    with pytest.raises(ConfigError) as caught:
        Config.from_environ(env)
    assert str(caught.value).startswith(variable)
