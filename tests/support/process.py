"""Run `python -m server serve` as a real process, as an operator would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
