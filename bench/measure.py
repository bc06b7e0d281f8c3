"""One target under load: a warm-up run, then the measured runs, each checked for correctness.

Each run also records the server process's CPU time per request: it does not count time the
server waits for a busy machine, so it compares code changes better than req/s does. It still
moves with the machine's own speed (on the shared bench VM it once rose 25-37% for every
Python-heavy case within one run while the echo's rose 4%), so compare code by alternating
runs of both versions, not against a number from another run.

Pairing: given a `paired` target (the bare echo), each measured run of a case follows one run
of that echo with the same load, and the case's ratio is the median of the per-run ratios. The
two runs of a pair are seconds apart, so the machine's drift over a long bench (measured on
2026-12-02: the echo at 4,715 req/s at one moment and 7,471 req/s twenty minutes later) cancels
out of the ratio instead of landing on whichever cases ran while the machine was slow.

A run is correct when the load generator completed every request and, for a trustplane
target, the server's own counters agree (`bench.scrape`). The reported run is the median by
req/s. The generator is h2load, or for a target with `unique_field` (a body per request)
`bench.grpcload` in a process of its own under the same CPU pinning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

from bench import grpcload, h2load, scrape
from bench.cases import Headers
from bench.h2load import H2LoadError, LoadShape, Run

_GENERATOR_TIMEOUT = 300.0


@dataclass(frozen=True)
class Target:
    """Where h2load sends what; `metrics_url` set means "check the server's counters"."""

    name: str
    address: str  # host:port
    path: str  # "/package.Service/Method"
    request: bytes  # serialized message, not framed
    headers: Headers = ()
    metrics_url: str | None = None
    pid: int | None = None  # the server process, for its CPU time per request
    # Non-zero: each request carries a fresh UUID in this string field (bench.grpcload).
    unique_field: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.address}{self.path}"


@dataclass(frozen=True)
class Measurement:
    """The measured runs of one target, the median one, and every correctness problem."""

    name: str
    runs: tuple[Run, ...]
    problems: tuple[str, ...]
    paired: tuple[Run, ...] = ()  # the echo run just before each of `runs` (pairing), or none

    @property
    def median(self) -> Run:
        ordered = sorted(self.runs, key=lambda run: run.requests_per_second)
        return ordered[len(ordered) // 2]

    @property
    def paired_ratio(self) -> float | None:
        """The median over the runs of req/s over the paired echo run's (None: not paired)."""
        if not self.paired:
            return None
        ratios = [
            run.requests_per_second / echo.requests_per_second
            for run, echo in zip(self.runs, self.paired, strict=True)
            if echo.requests_per_second
        ]
        return _median(ratios)

    @property
    def paired_cpu_ratio(self) -> float | None:
        """The median over the runs of the paired echo's server CPU per request over this
        target's (None: not paired or CPU not measured)."""
        if not self.paired:
            return None
        ratios = [
            echo.server_cpu_us / run.server_cpu_us
            for run, echo in zip(self.runs, self.paired, strict=True)
            if run.server_cpu_us and echo.server_cpu_us
        ]
        return _median(ratios)


def _median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


async def measure(
    target: Target,
    shape: LoadShape,
    runs: int,
    workdir: Path,
    prefix: Sequence[str] = (),
    paired: Target | None = None,
) -> Measurement:
    """Warm up once (not reported, still checked), then run `runs` times; with `paired`, each
    measured run right after a run of `paired` under the same load (see the module docstring)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", target.name).strip("-")
    body = workdir / f"{slug}.grpc"
    body.write_bytes(h2load.frame(target.request))
    echo_body = workdir / f"{slug}-paired.grpc"
    if paired is not None:
        echo_body.write_bytes(h2load.frame(paired.request))
    problems: list[str] = []
    labels = ["warm-up", *(f"run {i}" for i in range(1, runs + 1))]
    results, echoes = [], []
    for label in labels:
        load = warmup_shape(shape) if label == "warm-up" else shape
        tag = label.replace(" ", "")
        if paired is not None and label != "warm-up":
            log_file = workdir / f"{slug}-{tag}-paired.log"
            echo_run, found = await _checked_run(paired, echo_body, load, log_file, prefix)
            problems += [f"{paired.name} before {target.name}, {label}: {p}" for p in found]
            echoes.append(echo_run)
        log_file = workdir / f"{slug}-{tag}.log"
        run, found = await _checked_run(target, body, load, log_file, prefix)
        problems += [f"{target.name}, {label}: {problem}" for problem in found]
        results.append(run)
    return Measurement(target.name, tuple(results[1:]), tuple(problems), tuple(echoes))


def warmup_shape(shape: LoadShape) -> LoadShape:
    """A quarter of a measured run (at least one request per stream)."""
    return replace(shape, requests=max(shape.requests // 4, shape.in_flight))


async def _checked_run(
    target: Target, body: Path, shape: LoadShape, log_file: Path, prefix: Sequence[str]
) -> tuple[Run, list[str]]:
    before = None
    if target.metrics_url is not None:
        before = await scrape.rpc_calls(target.metrics_url, target.path)
    cpu_before = _cpu_seconds(target.pid)
    if target.unique_field:
        run = await _generated_run(target, shape, log_file, prefix)
    else:
        run = await h2load.run(
            target.url, body, target.headers, shape, log_file=log_file, prefix=prefix
        )
    cpu_after = _cpu_seconds(target.pid)
    if cpu_before is not None and cpu_after is not None and run.succeeded:
        run = replace(run, server_cpu_us=(cpu_after - cpu_before) / run.succeeded * 1e6)
    found = client_problems(run, shape)
    if target.metrics_url is not None and before is not None:
        after = await scrape.rpc_calls(target.metrics_url, target.path)
        found += scrape.problems(before, after, run.succeeded)
    return run, found


async def _generated_run(
    target: Target, shape: LoadShape, log_file: Path, prefix: Sequence[str]
) -> Run:
    """One `bench.grpcload` run in its own process; its JSON result as a `Run`."""
    args = grpcload.command(
        target.address, target.path, target.headers, target.request, target.unique_field, shape
    )
    proc = await asyncio.create_subprocess_exec(
        *prefix, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), _GENERATOR_TIMEOUT)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    await asyncio.to_thread(log_file.write_bytes, err)
    if proc.returncode != 0:
        tail = err.decode(errors="replace")[-500:]
        raise H2LoadError(f"bench.grpcload exited with {proc.returncode}: {tail}")
    return grpcload.to_run(json.loads(out))


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process (its threads included), or None."""
    if pid is None:
        return None
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def client_problems(run: Run, shape: LoadShape) -> list[str]:
    """The generator's own view: every request must have completed (h2load: with a 2xx/3xx
    status; bench.grpcload: with gRPC status OK)."""
    if run.succeeded == shape.requests:
        return []
    return [
        f"load generator: {run.succeeded} of {shape.requests} requests succeeded "
        f"({run.failed} failed, {run.errored} errored, {run.timeout} timed out)"
    ]
