"""Driving h2load: gRPC framing, the command line, and parsing its summary and log file.

h2load speaks h2c with prior knowledge to a plain `http://` URL and sends the same body (one
pre-encoded gRPC message) on every stream. It only sees HTTP statuses: gRPC errors travel in
trailers, so correctness is checked server-side (`bench.scrape`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BINARY = "h2load"
GRPC_HEADERS = (("content-type", "application/grpc"), ("te", "trailers"))
_RUN_TIMEOUT = 300.0
_FINISHED = re.compile(r"^finished in \S+, ([\d.]+) req/s", re.MULTILINE)
_REQUESTS = re.compile(
    r"^requests: (?P<total>\d+) total, \d+ started, (?P<done>\d+) done, "
    r"(?P<succeeded>\d+) succeeded, (?P<failed>\d+) failed, (?P<errored>\d+) errored, "
    r"(?P<timeout>\d+) timeout",
    re.MULTILINE,
)


class H2LoadError(RuntimeError):
    """h2load could not run, or its output could not be parsed."""


@dataclass(frozen=True)
class LoadShape:
    """How much load one run sends."""

    requests: int
    clients: int
    streams: int  # concurrent streams per client

    @property
    def in_flight(self) -> int:
        return self.clients * self.streams


@dataclass(frozen=True)
class Run:
    """One h2load run: its throughput, outcome counts and latency percentiles."""

    requests_per_second: float
    total: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    p50_ms: float
    p99_ms: float
    server_cpu_us: float | None = None  # server process CPU time per request, when known


def frame(message: bytes, compressed: bool = False) -> bytes:
    """The gRPC length-prefixed message: flag byte, 4-byte big-endian length, message."""
    return struct.pack(">BI", int(compressed), len(message)) + message


def command(
    url: str,
    body: Path,
    headers: Sequence[tuple[str, str]],
    shape: LoadShape,
    log_file: Path,
) -> list[str]:
    """The h2load argument list (one thread: h2load gets one core)."""
    args = [BINARY, "-n", str(shape.requests), "-c", str(shape.clients)]
    args += ["-m", str(shape.streams), "-t", "1", "-d", str(body), "--log-file", str(log_file)]
    for name, value in (*GRPC_HEADERS, *headers):
        args += ["-H", f"{name}: {value}"]
    return [*args, url]


async def run(
    url: str,
    body: Path,
    headers: Sequence[tuple[str, str]],
    shape: LoadShape,
    *,
    log_file: Path,
    prefix: Sequence[str] = (),
) -> Run:
    """Run h2load once (under `prefix`, e.g. taskset) and parse the result."""
    args = [*prefix, *command(url, body, headers, shape, log_file)]
    stdout = await _execute(args)
    return parse(stdout, read_latencies_us(log_file))


async def _execute(args: Sequence[str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), _RUN_TIMEOUT)
    except TimeoutError:
        await _kill(proc)
        raise H2LoadError(f"h2load did not finish within {_RUN_TIMEOUT:.0f} s") from None
    except asyncio.CancelledError:
        await _kill(proc)
        raise
    if proc.returncode != 0:
        raise H2LoadError(f"h2load exited with {proc.returncode}: {err.decode(errors='replace')}")
    return out.decode(errors="replace")


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def parse(stdout: str, latencies_us: Sequence[int]) -> Run:
    """Build a `Run` from h2load's summary and the per-request latencies."""
    finished = _FINISHED.search(stdout)
    requests = _REQUESTS.search(stdout)
    if finished is None or requests is None:
        raise H2LoadError(f"unexpected h2load output:\n{stdout}")
    ordered = sorted(latencies_us)
    return Run(
        requests_per_second=float(finished.group(1)),
        total=int(requests["total"]),
        succeeded=int(requests["succeeded"]),
        failed=int(requests["failed"]),
        errored=int(requests["errored"]),
        timeout=int(requests["timeout"]),
        p50_ms=percentile(ordered, 50) / 1000,
        p99_ms=percentile(ordered, 99) / 1000,
    )


def read_latencies_us(log_file: Path) -> list[int]:
    """Response times (µs) of the completed requests in an h2load `--log-file`.

    Each line is tab-separated: start time (µs since epoch), HTTP status (-1 for a failed
    stream), µs until the end of the response; later h2load versions may add columns.
    """
    latencies = []
    for line in log_file.read_text().splitlines():
        columns = line.split("\t")
        if len(columns) >= 3 and columns[1] != "-1":
            latencies.append(int(columns[2]))
    return latencies


def percentile(ordered: Sequence[int], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence (nan when empty)."""
    if not ordered:
        return math.nan
    rank = math.ceil(pct / 100 * len(ordered))
    return float(ordered[max(rank, 1) - 1])


async def version() -> str:
    """`h2load --version`, e.g. "h2load nghttp2/1.52.0"."""
    return (await _execute([BINARY, "--version"])).strip()
