"""The Markdown report: the table (echo ceiling first), the machine facts and the verdicts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from bench.h2load import LoadShape
from bench.measure import Measurement

_HEADER = (
    "| RPC | req/s | items/s | p50 ms | p99 ms | ratio to echo | target | met "
    "| server CPU µs/req | CPU ratio |\n"
    "|---|---:|---:|---:|---:|---:|:---:|:---:|---:|---:|"
)


@dataclass(frozen=True)
class Scored:
    """A case's measurement with its target ratio. `ceiling`: the echo ceiling it is compared
    with when not the h2load one (a case driven by the grpc.aio generator)."""

    measurement: Measurement
    target_ratio: float
    items: int = 1  # items per request (batch RPCs)
    target_items_per_s: float = 0.0  # when set, the target is a throughput, not a ratio
    ceiling: Measurement | None = None  # its own echo ceiling (generator cases), else h2load's
    ratio_to: str = ""  # the case the ratio is over, instead of the echo ceiling
    baseline: Measurement | None = None  # that case's measurement (None: not measured)
    target_p99_ms: float = 0.0  # non-zero: the median run's p99 must be at most this too

    def ratio(self, ceiling: Measurement) -> float:
        """Paired (bench.measure): the median per-run ratio to the echo run just before, and
        over another case the quotient of the two paired ratios. Unpaired: median req/s over
        the ceiling's (or the other case's) median req/s."""
        if self.ratio_to:
            if self.baseline is None:
                return 0.0
            mine, theirs = self.measurement.paired_ratio, self.baseline.paired_ratio
            if mine is not None and theirs is not None:
                return mine / theirs if theirs else 0.0
            below = self.baseline
        else:
            paired = self.measurement.paired_ratio
            if paired is not None:
                return paired
            below = self.ceiling or ceiling
        if not below.median.requests_per_second:
            return 0.0
        return self.measurement.median.requests_per_second / below.median.requests_per_second

    def ratio_cell(self, ceiling: Measurement) -> str:
        if not self.ratio_to:
            return f"{self.ratio(ceiling):.2f}"
        if self.baseline is None:
            return f"— (to {self.ratio_to}: not measured)"
        return f"{self.ratio(ceiling):.2f} (to {self.ratio_to})"

    @property
    def items_per_s(self) -> float:
        return self.measurement.median.requests_per_second * self.items

    @property
    def report_only(self) -> bool:
        return not self.target_items_per_s and not self.target_ratio

    def target(self) -> str:
        if self.report_only:
            return "report"
        latency = f", p99 ≤ {self.target_p99_ms:g} ms" if self.target_p99_ms else ""
        if self.target_items_per_s:
            return f"≥ {self.target_items_per_s:,.0f} items/s{latency}"
        return f"≥ {self.target_ratio:.2f}{latency}"

    def met(self, ceiling: Measurement) -> bool:
        """The target is met by a correct measurement at or above the target (and, for a ratio
        to another case, a correct measurement of that case)."""
        if self.measurement.problems:
            return False
        if self.ratio_to and (self.baseline is None or self.baseline.problems):
            return False
        if self.target_p99_ms and self.measurement.median.p99_ms > self.target_p99_ms:
            return False
        if self.target_items_per_s:
            return self.items_per_s >= self.target_items_per_s
        return self.ratio(ceiling) >= self.target_ratio

    def verdict(self, ceiling: Measurement) -> str:
        if self.measurement.problems:
            return "**INCORRECT**"
        if self.report_only:
            return "—"
        return "yes" if self.met(ceiling) else "**NO**"


@dataclass(frozen=True)
class Facts:
    """What the numbers depend on besides the code."""

    nproc: int
    placement: str
    h2load_version: str
    shape: LoadShape
    runs: int
    elapsed_s: float


def table(
    echo: Measurement, cases: Sequence[Scored], generator_echo: Measurement | None = None
) -> str:
    """The results table, the echo ceilings first."""
    lines = [_HEADER, _row(echo, "—", "1.00", "—", "—", echo)]
    if generator_echo is not None:
        lines.append(_row(generator_echo, "—", "1.00", "—", "—", generator_echo))
    for case in cases:
        items = f"{case.items_per_s:,.0f}" if case.items > 1 else "—"
        lines.append(
            _row(
                case.measurement,
                items,
                case.ratio_cell(echo),
                case.target(),
                case.verdict(echo),
                case.ceiling or echo,
            )
        )
    return "\n".join(lines)


def _cpu(measurement: Measurement) -> float | None:
    """Median server CPU µs per request over the measured runs (None if not measured)."""
    values = sorted(r.server_cpu_us for r in measurement.runs if r.server_cpu_us is not None)
    return values[len(values) // 2] if values else None


def _row(
    measurement: Measurement, items: str, ratio: str, target: str, met: str, echo: Measurement
) -> str:
    run = measurement.median
    cpu, echo_cpu = _cpu(measurement), _cpu(echo)
    cpu_ratio = _cpu_ratio(cpu, echo_cpu, measurement)
    cells = [
        measurement.name,
        f"{run.requests_per_second:,.0f}",
        items,
        f"{run.p50_ms:.2f}",
        f"{run.p99_ms:.2f}",
        ratio,
        target,
        met,
        "—" if cpu is None else f"{cpu:,.0f}",
        cpu_ratio,
    ]
    return "| " + " | ".join(cells) + " |"


def _cpu_ratio(cpu: float | None, echo_cpu: float | None, measurement: Measurement) -> str:
    if measurement.paired:  # paired: never the start-of-bench echo's CPU as a fallback
        paired = measurement.paired_cpu_ratio
        return "—" if paired is None else f"{paired:.2f}"
    return "—" if cpu is None or echo_cpu is None else f"{echo_cpu / cpu:.2f}"


def pairing_lines(cases: Sequence[Scored]) -> list[str]:
    """How the ratios were formed, and how far the paired echo runs moved over the bench (the
    machine's drift, which pairing takes out of the ratios but not out of absolute targets)."""
    echoes = [
        run.requests_per_second
        for case in cases
        if case.ceiling is None  # h2load's echo; generator cases pair with the generator's
        for run in case.measurement.paired
    ]
    if not echoes:
        return []
    return [
        "Ratios to the echo are paired: each measured run of a case came right after a run of"
        " the bare echo under the same load, and the ratio (and the CPU ratio) is the median of"
        " the per-run ratios; a ratio to another case is the quotient of the two paired ratios."
        " The echo rows were measured once, at the start. Over this bench the paired h2load echo"
        f" runs ranged from {min(echoes):,.0f} to {max(echoes):,.0f} req/s: the machine's drift,"
        " which pairing takes out of the ratios but not out of items/s targets.",
        "",
    ]


def generator_line(generator_echo: Measurement | None) -> list[str]:
    if generator_echo is None:
        return []
    return [
        "Cases marked “unique request ids” are sent by `bench.grpcload` (grpc.aio, a fresh request"
        " id per call, pinned like h2load) and their ratio is to the echo as that generator"
        " drives it (paired runs with each case's own body; its start-of-bench row above),"
        " not to h2load's.",
        "",
    ]


def facts_line(facts: Facts) -> str:
    shape = facts.shape
    return (
        f"Machine: nproc {facts.nproc}; {facts.placement}; {facts.h2load_version}; "
        f"{shape.requests} requests per run, {shape.clients} clients x {shape.streams} streams "
        f"= {shape.in_flight} in flight; median of {facts.runs} run(s) after 1 warm-up; "
        f"bench took {facts.elapsed_s:.0f} s."
    )


def latency_lines(echo: Measurement, cases: Sequence[Scored], shape: LoadShape) -> list[str]:
    """For each p99 target, the throughput it takes by Little's law (mean latency = requests in
    flight / throughput, and a p99 is at least the mean) beside what the echo ceiling reached:
    when even the bare echo is below it, the target cannot be met at this load on this machine."""
    lines = []
    for case in cases:
        if not case.target_p99_ms:
            continue
        needed = shape.in_flight / (case.target_p99_ms / 1000)
        run = (case.ceiling or echo).median
        floor = shape.in_flight / run.requests_per_second * 1000
        verdict = "below it" if run.requests_per_second < needed else "above it"
        lines += [
            f"Latency: {case.measurement.name} p99 ≤ {case.target_p99_ms:g} ms at "
            f"{shape.in_flight} in flight needs ≥ {needed:,.0f} req/s (Little's law); the echo "
            f"ceiling reached {run.requests_per_second:,.0f} req/s ({verdict}: mean latency "
            f"{floor:.1f} ms, p99 {run.p99_ms:.2f} ms).",
            "",
        ]
    return lines


def summary_line(echo: Measurement, cases: Sequence[Scored]) -> str:
    targeted = [case for case in cases if not case.report_only or case.measurement.problems]
    missed = [case for case in targeted if not case.met(echo)]
    if not missed:
        return f"Targets: all {len(targeted)} met ({len(cases) - len(targeted)} reported only)."
    names = ", ".join(
        f"{c.measurement.name} ({c.ratio_cell(echo)}{_p99_cell(c)} vs {c.target()}"
        f"{', incorrect' if c.measurement.problems else ''})"
        for c in missed
    )
    return f"Targets: {len(missed)} of {len(targeted)} MISSED: {names}."


def _p99_cell(case: Scored) -> str:
    return f", p99 {case.measurement.median.p99_ms:.1f} ms" if case.target_p99_ms else ""


def with_baselines(cases: Sequence[Scored]) -> list[Scored]:
    """Each case whose ratio is to another case, given that case's measurement."""
    measured = {case.measurement.name: case.measurement for case in cases}
    return [
        replace(case, baseline=measured.get(case.ratio_to)) if case.ratio_to else case
        for case in cases
    ]


def correctness_lines(problems: Sequence[str]) -> list[str]:
    if not problems:
        return [
            "Correctness: OK (every request completed; server-side status counts match h2load)."
        ]
    return ["Correctness: FAILED", *(f"- {problem}" for problem in problems)]


def render(
    echo: Measurement,
    cases: Sequence[Scored],
    facts: Facts,
    generator_echo: Measurement | None = None,
) -> str:
    """The whole report as Markdown."""
    problems = [*echo.problems, *(p for c in cases for p in c.measurement.problems)]
    if generator_echo is not None:
        problems += generator_echo.problems
    parts = [
        "# trustplane bench",
        "",
        table(echo, cases, generator_echo),
        "",
        facts_line(facts),
        "",
        *pairing_lines(cases),
        *generator_line(generator_echo),
        *latency_lines(echo, cases, facts.shape),
        summary_line(echo, cases),
        "",
        *correctness_lines(problems),
    ]
    return "\n".join(parts) + "\n"
