"""Simulator speed: simulated requests per wall-second vs a bare SimPy loop, measured in the same run.

The bare loop is the floor any SimPy model pays: per request one process, one resource request and one
timeout (`simspeed.bare_simpy`). The ratio (tierlab rate / bare rate) is what is checked, so a slow or noisy
machine slows both sides alike. Target: >= 1/3 (printed). A run fails below a floor (QUICK_MIN_RATIO, MIN_RATIO),
and the regression check (conftest.py) fails it when the quick scenario's CPU-time ratio falls below its baseline
(baseline.json) by more than the tolerance.

CI runs the quick scenario (first 20 minutes of servegen_r1, QUICK_ROUNDS paired rounds). The two-hour
scenario and the one-day 1M-request replay take minutes: they run with TIERLAB_BENCH_SLOW=1.
"""

from __future__ import annotations

import os
import statistics

import pytest

from experiments.setup import build
from tests.benchmarks.simspeed import SIM_METRIC, TWO_HOURS, PairedRun, measure
from tests.conftest import config

TARGET_RATIO = 1 / 3  # the target
# What CI enforces: a regression floor. On this 2-core machine the paired ratio of the two-hour scenario moves
# by about +-0.1 from run to run (measured 0.34-0.43), so asserting the target itself would fail on noise.
MIN_RATIO = 0.25
# The quick scenario's ratio is lower than the two-hour one's: wall-time medians of 5 rounds measured 0.23-0.31
# here at load average 2-4.8, lowest under load. This floor only catches a
# collapse; the baseline comparison of the CPU-time ratio (conftest, baseline.json) catches a regression.
QUICK_MIN_RATIO = 0.15
only_if_slow_asked = pytest.mark.skipif(os.environ.get("TIERLAB_BENCH_SLOW") != "1",
                                        reason="minutes long: set TIERLAB_BENCH_SLOW=1 to run")


def _verdict(ratio: float) -> str:
    return f"target >= {TARGET_RATIO:.2f} {'met' if ratio >= TARGET_RATIO else 'MISSED'}; CI floor {MIN_RATIO:.2f}"


def _describe(run: PairedRun) -> str:
    return (f"tierlab {statistics.median(run.sim_req_per_s()):,.0f} req/s, bare SimPy"
            f" {statistics.median(run.bare_req_per_s()):,.0f} req/s, median paired ratio {run.wall_ratio:.2f} wall,"
            f" {run.cpu_ratio:.2f} CPU ({len(run.sims)} rounds of {run.requests:,} requests)")


def test_sim_rate_vs_bare_simpy(benchmark, report_metric, quick_sim):
    """Scenario: simspeed.QUICK (servegen_r1, first 20 minutes), medium cluster, seed_tiered."""
    run = benchmark.pedantic(quick_sim.run, rounds=1, iterations=1)
    report_metric(SIM_METRIC, run.cpu_ratio, "higher")
    benchmark.extra_info.update({"requests": run.requests, "sim_req_per_s": run.sim_req_per_s(),
                                 "bare_req_per_s": run.bare_req_per_s(), "ratio": run.wall_ratio,
                                 "cpu_ratio": run.cpu_ratio})
    print(f"\n{_describe(run)} (CI floor {QUICK_MIN_RATIO:.2f}; the {TARGET_RATIO:.2f} target is for the two-hour"
          " scenario: TIERLAB_BENCH_SLOW=1)")
    assert len(run.outputs) == len(run.sims) and all(o["requests"] == run.requests for o in run.outputs)
    assert run.wall_ratio >= QUICK_MIN_RATIO


@pytest.mark.slow
@only_if_slow_asked
def test_sim_rate_vs_bare_simpy_two_hours(benchmark):
    """Scenario: conf workload=servegen_r1 cut to its first 2 hours, medium cluster, seed_tiered."""
    s = build(config(*TWO_HOURS))
    run = benchmark.pedantic(measure, args=(s, 3), rounds=1, iterations=1)
    benchmark.extra_info.update({"requests": run.requests, "sim_req_per_s": run.sim_req_per_s(),
                                 "bare_req_per_s": run.bare_req_per_s(), "ratio": run.wall_ratio})
    print(f"\n{_describe(run)} ({_verdict(run.wall_ratio)})")
    assert all(o["requests"] == run.requests for o in run.outputs)
    assert run.wall_ratio >= MIN_RATIO


@pytest.mark.slow
@only_if_slow_asked
def test_one_day_million_request_replay(benchmark):
    """conf workload=replay_1m: ServeGen deepseek-r1, one day, ~1.0M requests, 73 deployments."""
    s = build(config("workload=replay_1m", "output.plots=false"))
    n = len(s.workload)
    assert 0.95e6 < n < 1.05e6
    run = benchmark.pedantic(measure, args=(s, 1), rounds=1, iterations=1)
    summary = run.outputs[0]
    benchmark.extra_info.update({"requests": n, "sim_wall_s": summary["wall_s"], "ratio": run.wall_ratio})
    print(f"\n1M replay: {n:,} requests, {summary['sim_s']:.0f} s simulated in {summary['wall_s']:.1f} s wall "
          f"({summary['requests_per_wall_s']:,.0f} req/s); bare SimPy {run.bare_req_per_s()[0]:,.0f} req/s; ratio "
          f"{run.wall_ratio:.2f} ({_verdict(run.wall_ratio)})")
    assert summary["completed"] + summary["rejected"] + summary["failed"] == n
    assert run.wall_ratio >= MIN_RATIO
