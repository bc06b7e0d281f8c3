"""The processes under test: the echo ceiling and the trustplane server.

Each runs as a subprocess pinned to one core with `taskset` (h2load gets another one), is
ready only once it answers, and is always stopped with SIGTERM when its context exits, on errors
and Ctrl-C included.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
import grpc.aio
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.tokens import TestIdP

ROOT = Path(__file__).resolve().parent.parent
_STOP_TIMEOUT = 30.0
_ECHO_TIMEOUT = 15.0
_SERVER_TIMEOUT = 60.0  # embedded PostgreSQL initdb takes ~5 s, more on a busy machine
_PASSED_THROUGH = (("BENCH_DATABASE_URL", "DATABASE_URL"), ("BENCH_REDIS_URL", "REDIS_URL"))


class ServerError(RuntimeError):
    """A server process did not start (the message carries the end of its log)."""


@dataclass(frozen=True)
class Placement:
    """Which CPU the servers and h2load run on; `None` CPUs mean unpinned."""

    server_cpu: int | None
    load_cpu: int | None
    note: str

    @classmethod
    def detect(cls) -> Placement:
        """Pin to the first two usable CPUs when `taskset` exists and there are two."""
        cpus = sorted(os.sched_getaffinity(0))
        if shutil.which("taskset") is None:
            return cls(None, None, "unpinned (taskset not found)")
        if len(cpus) < 2:
            return cls(None, None, f"unpinned (only {len(cpus)} usable CPU)")
        server, load = cpus[0], cpus[1]
        note = f"servers pinned to CPU {server}, h2load to CPU {load} (taskset); embedded"
        return cls(server, load, f"{note} PostgreSQL on every CPU but {server}")

    def server_prefix(self) -> list[str]:
        return _taskset(self.server_cpu)

    def load_prefix(self) -> list[str]:
        return _taskset(self.load_cpu)


def _taskset(cpu: int | None) -> list[str]:
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


@dataclass(frozen=True)
class Trustplane:
    """A running trustplane server."""

    address: str
    metrics_url: str
    idp: TestIdP  # the token issuer the server trusts
    tenant: str  # a tenant made by `python -m server bootstrap`, and its owner's credentials
    email: str
    password: str
    pid: int  # the server process


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def base_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment for a server: ours without TRUSTPLANE_*/DATABASE_URL/REDIS_URL, with
    the repository on PYTHONPATH, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TRUSTPLANE_") and k not in {"DATABASE_URL", "REDIS_URL"}
    }
    paths = [
        str(ROOT),
        str(ROOT / "generated"),
        str(ROOT / "tests" / "generated"),
        env.get("PYTHONPATH", ""),
    ]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return {**env, **extra}


def trustplane_env(
    listen: str, metrics_listen: str, data_dir: Path, idp: TestIdP
) -> dict[str, str]:
    """TRUSTPLANE_* for the bench; DATABASE_URL/REDIS_URL only from BENCH_* (else embedded).
    The rate limit is lifted: the bench measures the chain, not the limiter refusing."""
    extra = {
        "TRUSTPLANE_LISTEN": listen,
        "TRUSTPLANE_METRICS_LISTEN": metrics_listen,
        "TRUSTPLANE_LOG_LEVEL": "WARNING",
        "TRUSTPLANE_DATA_DIR": str(data_dir),
        "TRUSTPLANE_TRUSTED_ISSUERS_FILE": str(idp.issuers_file),
        "TRUSTPLANE_RATE_LIMIT": "1000000000",
        "TRUSTPLANE_RATE_BURST": "1000000000",
        # Login is measured too: let it run into argon2, not into the brute-force limiter.
        "TRUSTPLANE_LOGIN_MAX_ATTEMPTS": "1000",
        "TRUSTPLANE_LOGIN_WINDOW": "1",
        "TRUSTPLANE_ACCESS_TOKEN_TTL": "3600",
    }
    for source, target in _PASSED_THROUGH:
        if os.environ.get(source):
            extra[target] = os.environ[source]
    # Experiments: BENCH_SERVER_ENV="TRUSTPLANE_AUDIT=off TRUSTPLANE_AUDIT_LINGER=0.005".
    for pair in os.environ.get("BENCH_SERVER_ENV", "").split():
        name, _, value = pair.partition("=")
        if not name.startswith("TRUSTPLANE_"):
            raise ValueError(f"BENCH_SERVER_ENV: {name!r} is not a TRUSTPLANE_ setting")
        extra[name] = value
    return base_env(extra)


@contextlib.asynccontextmanager
async def echo(placement: Placement, workdir: Path) -> AsyncIterator[tuple[str, int]]:
    """Run `python -m bench.echo`; yield its address and pid once it printed "ready"."""
    port = free_port()
    args = [*placement.server_prefix(), sys.executable, "-m", "bench.echo", "--port", str(port)]
    log_path = workdir / "echo.log"
    with log_path.open("wb") as log:
        proc = await _spawn(args, base_env({}), log, stdout=asyncio.subprocess.PIPE)
        try:
            await _await_ready_line(proc, log_path)
            yield f"127.0.0.1:{port}", proc.pid
        finally:
            await stop(proc)


@contextlib.asynccontextmanager
async def trustplane(
    placement: Placement, workdir: Path, extra_env: Mapping[str, str] | None = None
) -> AsyncIterator[Trustplane]:
    """Run the real server — the same `App` and interceptor chain as `python -m server serve`,
    plus the test-only `tptest.v1.TestService` for methods behind authentication — on free
    ports with its data under `workdir` (and `extra_env` on top of the bench's settings);
    yield it once Health/Check answers SERVING."""
    address, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    data_dir = workdir / "data"
    data_dir.mkdir()
    idp_dir = workdir / "idp"
    idp_dir.mkdir()
    idp = TestIdP(idp_dir)
    env = {**trustplane_env(address, metrics, data_dir, idp), **(extra_env or {})}
    tenant, email = f"bench-{os.urandom(4).hex()}", "bench@localhost"
    password = await _bootstrap(env, tenant, email)
    args = [*placement.server_prefix(), sys.executable, "-m", "tests.support.app_process"]
    log_path = workdir / "trustplane.log"
    with log_path.open("wb") as log:
        proc = await _spawn(args, env, log)
        try:
            await _await_serving(proc, address, log_path)
            _place_postgres(data_dir, placement)
            yield Trustplane(
                address, f"http://{metrics}/metrics", idp, tenant, email, password, proc.pid
            )
        finally:
            await stop(proc)


async def _bootstrap(env: Mapping[str, str], tenant: str, email: str) -> str:
    """`python -m server bootstrap` against the server's database; the owner's password."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "bootstrap",
        "--tenant",
        tenant,
        "--email",
        email,
        env=dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    found = re.search(rb"password \(shown once\): (\S+)", out)
    if proc.returncode != 0 or found is None:
        raise ServerError(f"bootstrap failed ({proc.returncode}): {err.decode()[-500:]}")
    return found.group(1).decode()


def _place_postgres(data_dir: Path, placement: Placement) -> None:
    """The embedded PostgreSQL inherits the server's CPU pinning: its postmaster is started by
    the server and then detaches (its parent is init, so it is found by its pid file, not as
    the server's child). In a real deployment it runs on other hardware, so give it, and the
    backends it forks later, every CPU but the server's: left on the server's core it takes
    the server's CPU under write-heavy load, and the server's throughput then measures the
    two sharing one core (AppendEntries of 100 events with two commits in flight, measured on
    2026-12-02: 14-16k events/s with PostgreSQL on the server's core, 25-27k off it)."""
    try:
        postmaster = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        found = psutil.Process(postmaster)
        processes = [found, *found.children(recursive=True)]
    except (OSError, ValueError, IndexError, psutil.Error):
        return  # an external database (BENCH_DATABASE_URL): not ours to place
    everything = os.sched_getaffinity(0)
    others = everything - {placement.server_cpu} if placement.server_cpu is not None else set()
    for process in processes:
        with contextlib.suppress(psutil.Error, OSError):
            os.sched_setaffinity(process.pid, others or everything)


async def _spawn(
    args: Sequence[str], env: Mapping[str, str], log: IO[bytes], stdout: int | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *args,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log if stdout is None else stdout,
        stderr=log,
    )


async def _await_ready_line(proc: asyncio.subprocess.Process, log_path: Path) -> None:
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), _ECHO_TIMEOUT)
    except TimeoutError:
        line = b""
    if line.strip() != b"ready":
        raise ServerError(f"echo server did not start{_tail(log_path)}")


async def _await_serving(proc: asyncio.subprocess.Process, address: str, log_path: Path) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _SERVER_TIMEOUT
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while loop.time() < deadline:
            if proc.returncode is not None:
                raise ServerError(f"server exited with {proc.returncode}{_tail(log_path)}")
            if await _serving(stub):
                return
            await asyncio.sleep(0.2)
    raise ServerError(f"server not SERVING after {_SERVER_TIMEOUT:.0f} s{_tail(log_path)}")


async def _serving(stub: health_pb2_grpc.HealthStub) -> bool:
    request = health_pb2.HealthCheckRequest(service="")
    try:
        response = await stub.Check(request, timeout=1.0)
    except grpc.aio.AioRpcError:
        return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


async def stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, wait for a graceful exit, SIGKILL if it does not come."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), _STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _tail(log_path: Path, lines: int = 20) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.splitlines()[-lines:])
    return f"; last lines of {log_path.name}:\n{tail}" if tail else ""
