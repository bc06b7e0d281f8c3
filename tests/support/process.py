"""Run `python -m server serve` as a real process, as an operator would; or the test App
(`tests.support.app_process`) as a second process beside a test's server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def server_env(**overrides: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRUSTPLANE_", "DATABASE_", "REDIS_"))
    }
    env["PYTHONPATH"] = f"{ROOT}:{ROOT / 'generated'}"
    for key, value in overrides.items():
        if value is not None:
            env[key] = value
    return env


def run_server(
    *args: str, env: dict[str, str], cwd: Path = ROOT, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """`python -m server <args>` as an operator runs it, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def run_server_async(
    *args: str, env: dict[str, str], cwd: Path = ROOT, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """`run_server` off the event loop (for a test whose server runs in-process)."""
    return await asyncio.to_thread(run_server, *args, env=env, cwd=cwd, timeout=timeout)


def app_process_env(config: Any, **overrides: str) -> dict[str, str]:
    """The environment of a second App process sharing `config`'s PostgreSQL, Redis prefix,
    trusted issuers and data directory (so the same root key)."""
    env = server_env(
        DATABASE_URL=config.database.url,
        REDIS_URL=config.cache.url,
        TRUSTPLANE_CACHE_PREFIX=config.cache.prefix,
        TRUSTPLANE_LISTEN="127.0.0.1:0",
        TRUSTPLANE_METRICS_LISTEN="off",
        TRUSTPLANE_TRUSTED_ISSUERS_FILE=str(config.auth.trusted_issuers_file),
        TRUSTPLANE_DATA_DIR=str(config.data_dir),
        **overrides,
    )
    env["PYTHONPATH"] += f":{ROOT}/tests/generated"
    return env


def spawn_app(env: dict[str, str], module: str = "tests.support.app_process") -> Any:
    """Start `python -m <module>` (an App that prints `port=<n>` once serving)."""
    return subprocess.Popen(
        [sys.executable, "-m", module], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True
    )


async def app_port(process: Any, timeout: float = 60.0) -> int:
    """The port a spawned App printed once it serves."""
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout)
    return int(line.strip().removeprefix("port="))


@contextlib.asynccontextmanager
async def app_process(config: Any, **overrides: str) -> AsyncIterator[int]:
    """A second App process beside the test's server (see `app_process_env`); yields its
    port, and stops it with SIGTERM on exit."""
    process = spawn_app(app_process_env(config, **overrides))
    try:
        yield await app_port(process)
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 30)
        process.stdout.close()


class ServerProcess:
    """`python -m server serve ...` in its own process group; stopped with SIGTERM."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def wait_serving(self, address: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.output()}")
            if health_check(address) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.2)
        raise AssertionError(f"server not serving after {timeout}s")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self._collect(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self._collect(10)
        return self.proc.returncode

    def _collect(self, timeout: float) -> None:
        out, err = self.proc.communicate(timeout=timeout)
        self._output = out + err

    def output(self) -> str:
        """Everything the process printed; only once it has exited."""
        if self.proc.poll() is None:
            return ""
        if not hasattr(self, "_output"):
            self._collect(10)
        return self._output


def health_check(address: str) -> int | None:
    """One Check over a fresh connection; None when nothing answers."""
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.RpcError:
            return None
        return int(response.status)
