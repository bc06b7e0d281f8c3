"""`python -m bench` (`make bench`): measure every case against the bare echo ceiling.

Environment: BENCH_REQUESTS (per run, default 20000), BENCH_CLIENTS (default 4),
BENCH_STREAMS (concurrent streams per client, default 8), BENCH_RUNS (measured runs, default 3),
BENCH_CASES (comma-separated substrings of case names to run; default all),
BENCH_DATABASE_URL / BENCH_REDIS_URL (passed to the server as DATABASE_URL / REDIS_URL; unset:
embedded PostgreSQL and the in-process cache), BENCH_SERVER_ENV (space-separated
TRUSTPLANE_*=value settings for the server, for experiments such as TRUSTPLANE_AUDIT=off),
CERBOS_BIN (the Cerbos binary: the same Check policy in a Cerbos PDP gets a row of its own).

Exit status: 0 when every run was correct (missed targets are flagged, not fatal), 1 on a
correctness failure or when the bench could not run, 2 on a bad setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc.aio

from bench import cases, cerbos, echo, h2load, report, servers
from bench.cases import BenchContext, Case
from bench.h2load import H2LoadError, LoadShape
from bench.measure import Measurement, Target, measure
from bench.report import Facts, Scored
from bench.servers import Placement, ServerError

RESULTS = Path(__file__).resolve().parent / "results" / "latest.md"


class BenchError(RuntimeError):
    """The bench cannot run as configured."""


@dataclass(frozen=True)
class Settings:
    """The load shape and the number of measured runs."""

    shape: LoadShape
    runs: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        shape = LoadShape(
            requests=_positive(env, "BENCH_REQUESTS", 20000),
            clients=_positive(env, "BENCH_CLIENTS", 4),
            streams=_positive(env, "BENCH_STREAMS", 8),
        )
        if shape.requests < shape.clients:
            raise ValueError("BENCH_REQUESTS: must be at least BENCH_CLIENTS")
        return cls(shape, _positive(env, "BENCH_RUNS", 3))


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip() or str(default)
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name}: expected a positive integer, got {raw!r}")
    return int(raw)


@dataclass(frozen=True)
class Results:
    """Everything the report needs: the h2load echo ceiling, the cases, and the echo ceiling
    measured by the grpc.aio generator when a case needed it."""

    echo: Measurement
    cases: list[Scored]
    generator_echo: Measurement | None = None


@dataclass(frozen=True)
class Echo:
    """The bare echo server, up for the whole bench, and the request bytes of its ceiling."""

    address: str
    pid: int
    request: bytes  # the first case's request: what the h2load echo ceiling sends

    def paired(self, case: Case | None = None) -> Target:
        """The echo run that precedes each run of `case`: h2load's echo of the ceiling's bytes,
        or for a generator case the generator with that case's own body (no case: a target
        that is not a Case, such as Cerbos, sent by h2load)."""
        unique = case.unique_field if case is not None else 0
        request = case.request if case is not None and unique else self.request
        name = f"echo ceiling ({echo.PATH[1:]})"
        if unique:
            name = f"echo ceiling ({echo.PATH[1:]}, grpc.aio generator, unique bodies)"
        return Target(
            name,
            self.address,
            echo.PATH,
            request,
            pid=self.pid,
            unique_field=unique,
        )


async def run_bench(settings: Settings, placement: Placement, workdir: Path) -> Results:
    """Start the echo and the trustplane server, build the cases, measure the echo ceiling,
    then every case, each run paired with an echo run (bench.measure); then the variants'
    servers and Cerbos, paired with the same echo server."""
    async with servers.echo(placement, workdir) as (address, pid):
        wanted = os.environ.get("BENCH_CASES", "")
        async with contextlib.AsyncExitStack() as stack:
            server = await stack.enter_async_context(servers.trustplane(placement, workdir))
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(server.address))
            built = await cases.build_cases(
                BenchContext(
                    server.address,
                    channel,
                    server.idp,
                    server.tenant,
                    server.email,
                    server.password,
                )
            )
            if wanted:  # the first case stays: the echo ceiling sends its bytes
                built = built[:1] + [
                    c for c in built[1:] if any(w in c.name for w in wanted.split(","))
                ]
            if not built:
                raise BenchError("no cases: bench.cases.BUILDERS is empty")
            bare = Echo(address, pid, built[0].request)
            ceiling = await _measure_echo(built[0], settings, placement, workdir, bare)
            generated = [case for case in built if case.unique_field]
            generator_ceiling = None
            if generated:  # the same generator, body generation included, against the echo
                generator_ceiling = await _measure_echo(
                    generated[0], settings, placement, workdir, bare
                )
            scored = [
                await _measure_case(
                    case, server, settings, placement, workdir, bare, generator_ceiling
                )
                for case in built
            ]
        for variant in cases.VARIANTS:
            scored += await _measure_variant(variant, wanted, settings, placement, workdir, bare)
        scored += await _measure_cerbos(wanted, settings, placement, workdir, bare)
    return Results(ceiling, report.with_baselines(scored), generator_ceiling)


async def _measure_variant(
    variant: cases.Variant,
    wanted: str,
    settings: Settings,
    placement: Placement,
    workdir: Path,
    bare: Echo,
) -> list[Scored]:
    """Cases that need a differently configured server (e.g. a cache turned off): a server of
    their own. They run by default; with BENCH_CASES set, only when it selects one of them."""
    names = [name for name, _ in variant.builders]
    if wanted and not any(w in n for n in names for w in wanted.split(",")):
        return []
    directory = workdir / variant.name
    directory.mkdir()
    env = dict(variant.env)
    root_key = workdir / "data" / "root.key"
    if root_key.is_file():  # a shared BENCH_DATABASE_URL holds material wrapped by this key
        env.setdefault("TRUSTPLANE_ROOT_KEY_FILE", str(root_key))
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(servers.trustplane(placement, directory, env))
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(server.address))
        ctx = BenchContext(
            server.address, channel, server.idp, server.tenant, server.email, server.password
        )
        built = [await build(ctx) for name, build in variant.builders]
        if wanted:
            built = [c for c in built if any(w in c.name for w in wanted.split(","))]
        return [
            await _measure_case(case, server, settings, placement, directory, bare)
            for case in built
        ]


async def _measure_cerbos(
    wanted: str, settings: Settings, placement: Placement, workdir: Path, bare: Echo
) -> list[Scored]:
    """The same Check policy in a Cerbos PDP (bench.cerbos), reported beside ours, when
    CERBOS_BIN names its binary (`make bench` installs it) and BENCH_CASES selects it."""
    binary = os.environ.get("CERBOS_BIN", "")
    if not binary or (wanted and not any(w in cerbos.NAME for w in wanted.split(","))):
        return []
    if not os.path.isfile(binary):  # noqa: ASYNC240 (once, before any load)
        raise BenchError(f"CERBOS_BIN: {binary} is not a file")
    try:
        measured, _ = await cerbos.measure_pdp(
            binary, settings.shape, settings.runs, placement, workdir, bare.paired()
        )
    except cerbos.CerbosError as exc:
        raise BenchError(str(exc)) from None
    return [Scored(measured, 0.0)]


async def _measure_echo(
    first: Case, settings: Settings, placement: Placement, workdir: Path, bare: Echo
) -> Measurement:
    """The ceiling: `first`'s request bytes echoed by the bare grpc.aio server, sent by h2load,
    or for a case with `unique_field` by bench.grpcload with a fresh request id per call."""
    target = bare.paired(first)  # the same target as the echo runs paired with `first`
    return await measure(
        target, _shape(first, settings), settings.runs, workdir, placement.load_prefix()
    )


def _shape(case: Case, settings: Settings) -> LoadShape:
    """The load of one run: BENCH_REQUESTS, or the case's own smaller count."""
    shape = settings.shape
    if case.requests is not None:
        shape = dataclasses.replace(shape, requests=max(case.requests, shape.in_flight))
    return shape


async def _measure_case(
    case: Case,
    server: servers.Trustplane,
    settings: Settings,
    placement: Placement,
    workdir: Path,
    bare: Echo,
    generator_ceiling: Measurement | None = None,
) -> Scored:
    target = Target(
        case.name,
        server.address,
        case.path,
        case.request,
        case.headers,
        server.metrics_url,
        server.pid,
        case.unique_field,
    )
    measured = await measure(
        target,
        _shape(case, settings),
        settings.runs,
        workdir,
        placement.load_prefix(),
        bare.paired(case),
    )
    ceiling = generator_ceiling if case.unique_field else None
    return Scored(
        measured,
        case.target_ratio,
        case.items,
        case.target_items_per_s,
        ceiling,
        case.ratio_to,
        target_p99_ms=case.target_p99_ms,
    )


async def main_async(settings: Settings) -> int:
    """Run the bench, print and save the report; 1 if any run was incorrect."""
    started = time.monotonic()
    _cancel_on_sigterm()
    placement = Placement.detect()
    version = await h2load.version()
    with tempfile.TemporaryDirectory(prefix="trustplane-bench-") as tmp:
        results = await run_bench(settings, placement, Path(tmp))
    facts = Facts(
        nproc=os.cpu_count() or 0,
        placement=placement.note,
        h2load_version=version,
        shape=settings.shape,
        runs=settings.runs,
        elapsed_s=time.monotonic() - started,
    )
    text = report.render(results.echo, results.cases, facts, results.generator_echo)
    print(text, end="")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)
    problems = [*results.echo.problems, *(p for c in results.cases for p in c.measurement.problems)]
    if results.generator_echo is not None:
        problems += results.generator_echo.problems
    return 1 if problems else 0


def _cancel_on_sigterm() -> None:
    """SIGTERM cancels the bench like Ctrl-C does, so the servers are still stopped."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


def main() -> int:
    try:
        settings = Settings.from_environ()
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(main_async(settings))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted", file=sys.stderr)
        return 130
    except (BenchError, H2LoadError, ServerError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
