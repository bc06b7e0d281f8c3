"""The bench report: a case whose ratio is to another case (the audited mutation over the same
mutation with audit off) rather than to the echo ceiling."""

from __future__ import annotations

from bench.h2load import Run
from bench.measure import Measurement
from bench.report import Scored, table, with_baselines


def measured(name: str, rps: float, problems: tuple[str, ...] = ()) -> Measurement:
    run = Run(rps, 100, 100, 0, 0, 0, 1.0, 2.0, server_cpu_us=500.0)
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
