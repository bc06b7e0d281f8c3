"""The bench report: a case whose ratio is to another case (the audited mutation over the same
mutation with audit off) rather than to the echo ceiling; a p99 target beside a ratio target."""

from __future__ import annotations

from bench.h2load import LoadShape, Run
from bench.measure import Measurement
from bench.report import (
    Scored,
    latency_lines,
    pairing_lines,
    summary_line,
    table,
    with_baselines,
)


def measured(
    name: str, rps: float, problems: tuple[str, ...] = (), p99_ms: float = 2.0
) -> Measurement:
    run = Run(rps, 100, 100, 0, 0, 0, 1.0, p99_ms, server_cpu_us=500.0)
    return Measurement(name, (run,), problems)


ECHO = measured("echo", 10_000)
OFF = "UpdateKey (audit off)"


def test_a_ratio_to_another_case_uses_its_measurement():
    audited = Scored(measured("UpdateKey (audited)", 900), 0.8, ratio_to=OFF)
    cases = with_baselines([audited, Scored(measured(OFF, 1000), 0.0)])
    assert cases[0].ratio(ECHO) == 0.9 and cases[0].met(ECHO)
    rendered = table(ECHO, cases)
    row = next(line for line in rendered.splitlines() if "(audited)" in line)
    assert f"0.90 (to {OFF})" in row and "≥ 0.80" in row and "| yes |" in row
    slow = with_baselines(
        [
            Scored(measured("UpdateKey (audited)", 700), 0.8, ratio_to=OFF),
            Scored(measured(OFF, 1000), 0.0),
        ]
    )
    assert not slow[0].met(ECHO) and slow[0].verdict(ECHO) == "**NO**"


def test_a_missing_or_incorrect_baseline_never_meets_the_target():
    alone = with_baselines([Scored(measured("UpdateKey (audited)", 900), 0.8, ratio_to=OFF)])
    assert not alone[0].met(ECHO) and "not measured" in alone[0].ratio_cell(ECHO)
    broken = with_baselines(
        [
            Scored(measured("UpdateKey (audited)", 900), 0.8, ratio_to=OFF),
            Scored(measured(OFF, 1000, ("h2load: 3 failed",)), 0.0),
        ]
    )
    assert not broken[0].met(ECHO)


def test_a_p99_target_must_be_met_beside_the_ratio():
    fast = Scored(measured("Check", 6000, p99_ms=9.0), 0.5, target_p99_ms=10.0)
    slow = Scored(measured("Check", 6000, p99_ms=31.0), 0.5, target_p99_ms=10.0)
    assert fast.met(ECHO) and fast.target() == "≥ 0.50, p99 ≤ 10 ms"
    assert not slow.met(ECHO) and slow.verdict(ECHO) == "**NO**"
    assert "Check (0.60, p99 31.0 ms vs ≥ 0.50, p99 ≤ 10 ms)" in summary_line(ECHO, [slow])


def test_the_latency_line_compares_littles_law_with_the_echo():
    shape = LoadShape(1000, 4, 8)  # 32 in flight: p99 <= 10 ms needs >= 3,200 req/s
    check = Scored(measured("Check", 1500, p99_ms=31.0), 0.5, target_p99_ms=10.0)
    [line, _] = latency_lines(measured("echo", 2800, p99_ms=14.7), [check], shape)
    assert "needs ≥ 3,200 req/s" in line and "reached 2,800 req/s (below it" in line
    assert "mean latency 11.4 ms, p99 14.70 ms" in line
    [line, _] = latency_lines(ECHO, [check], shape)
    assert "(above it" in line
    assert latency_lines(ECHO, [Scored(measured("Get", 1500), 0.5)], shape) == []


def paired(name: str, pairs: list[tuple[float, float]], cpu: float = 500.0) -> Measurement:
    """A measurement whose runs (case req/s) each followed an echo run (echo req/s)."""
    runs = tuple(Run(rps, 100, 100, 0, 0, 0, 1.0, 2.0, server_cpu_us=cpu) for rps, _ in pairs)
    echoes = tuple(  # the echo's CPU per request in the same proportion as its req/s
        Run(echo_rps, 100, 100, 0, 0, 0, 1.0, 2.0, server_cpu_us=cpu * rps / echo_rps)
        for rps, echo_rps in pairs
    )
    return Measurement(name, runs, (), echoes)


def test_a_paired_ratio_is_the_median_of_the_per_run_ratios():
    # The machine drifted: the echo ran at 8,000 then 5,000 then 6,000 req/s. Against the
    # start-of-bench echo (10,000) the case looks like 0.30-0.40; per pair it is 0.5 or more.
    case = Scored(paired("GetSession", [(4000, 8000), (2500, 5000), (3300, 6000)]), 0.5)
    assert case.ratio(ECHO) == 0.5 and case.met(ECHO)
    assert case.measurement.paired_cpu_ratio == 0.5
    slow = Scored(paired("GetSession", [(3000, 8000), (2400, 5000), (3300, 6000)]), 0.5)
    assert slow.ratio(ECHO) == 0.48 and not slow.met(ECHO)
    [line, _] = pairing_lines([case, slow])
    assert "ranged from 5,000 to 8,000 req/s" in line
    assert pairing_lines([Scored(measured("Health", 9000), 0.8)]) == []


def test_a_ratio_to_another_case_divides_the_paired_ratios():
    # The audited case ran while the machine was slow (echo 5,000), the baseline while it was
    # fast (echo 8,000): raw req/s give 0.50, the paired ratios 0.4 / 0.5 = 0.8.
    audited = Scored(paired("UpdateKey (audited)", [(2000, 5000)]), 0.8, ratio_to=OFF)
    off = Scored(paired(OFF, [(4000, 8000)]), 0.0)
    [scored, _] = with_baselines([audited, off])
    assert round(scored.ratio(ECHO), 6) == 0.8 and scored.met(ECHO)


def test_the_table_shows_the_paired_ratios():
    case = Scored(paired("GetSession", [(4000, 8000), (2500, 5000), (3300, 6000)]), 0.5)
    row = next(line for line in table(ECHO, [case]).splitlines() if "GetSession" in line)
    cells = [cell.strip() for cell in row.split("|")]
    assert cells[6] == "0.50" and cells[8] == "yes" and cells[10] == "0.50"


def test_a_paired_row_without_cpu_times_shows_no_cpu_ratio():
    run = Run(4000, 100, 100, 0, 0, 0, 1.0, 2.0)  # no server CPU measured
    echo = Run(8000, 100, 100, 0, 0, 0, 1.0, 2.0)
    case = Scored(Measurement("GetSession", (run,), (), (echo,)), 0.5)
    row = next(line for line in table(ECHO, [case]).splitlines() if "GetSession" in line)
    cells = [cell.strip() for cell in row.split("|")]
    assert cells[6] == "0.50" and cells[9] == "—" and cells[10] == "—"
