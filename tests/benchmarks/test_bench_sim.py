"""Simulator speed: simulated requests per wall-second vs a bare SimPy loop, measured in the same run.

The bare loop is the floor any SimPy model pays: per request one process, one resource
request and one timeout. The ratio (tierlab rate / bare rate) is what is checked, so a
slow or noisy machine slows both sides alike. Target: >= 1/3 (printed); CI fails below the regression floor MIN_RATIO.
"""

from __future__ import annotations

import gc
import statistics
import time

import numpy as np
import simpy

from experiments.setup import build
from sim.run import simulate
from tests.conftest import config

TARGET_RATIO = 1 / 3  # the target
# What CI enforces: a regression floor. On this 2-core machine the paired ratio moves by about +-0.1
# from run to run (measured 0.34-0.43), so asserting the target itself would fail on noise.
MIN_RATIO = 0.25


def bare_simpy_rate(arrival_s: np.ndarray, service_s: float = 1.0, capacity: int = 64) -> float:
    """Requests per wall-second of the simplest SimPy model of the same arrivals."""
    env = simpy.Environment()
    res = simpy.Resource(env, capacity)

    def job(env):
        with res.request() as req:
            yield req
            yield env.timeout(service_s)

    def source(env):
        for t in arrival_s.tolist():
            if t > env.now:
                yield env.timeout(t - env.now)
            env.process(job(env))

    env.process(source(env))
    t0 = time.perf_counter()
    env.run()
    return len(arrival_s) / (time.perf_counter() - t0)


def _verdict(ratio: float) -> str:
    return f"target >= {TARGET_RATIO:.2f} {'met' if ratio >= TARGET_RATIO else 'MISSED'}; CI floor {MIN_RATIO:.2f}"


def paired_ratio(run_sim, arrival_s: np.ndarray, rounds: int) -> tuple[float, list[float], list[float]]:
    """Median over rounds of tierlab's rate / the bare loop's, the bare loop timed just before and just
    after each simulation (so drifts in machine speed cancel), with a fresh garbage-collector state."""
    n = len(arrival_s)
    ratios, sims, bares = [], [], []
    for _ in range(rounds):
        gc.collect()
        before = bare_simpy_rate(arrival_s)
        gc.collect()
        t0 = time.perf_counter()
        run_sim()
        sim = n / (time.perf_counter() - t0)
        gc.collect()
        after = bare_simpy_rate(arrival_s)
        bare = (before + after) / 2
        sims.append(sim)
        bares.append(bare)
        ratios.append(sim / bare)
    return statistics.median(ratios), sims, bares


def test_sim_rate_vs_bare_simpy(benchmark):
    """Scenario: conf workload=servegen_r1 cut to its first 2 hours, medium cluster, seed_tiered."""
    overrides = ("workload=servegen_r1", "workload.window=[0,7200]", "output.plots=false")
    s = build(config(*overrides))
    n = len(s.workload)
    results = []

    def one_run():
        s.policy = build(config(*overrides)).policy  # policies keep per-run state: a fresh one per round
        results.append(simulate(s.cluster, s.models, s.engine, s.policy, s.workload))

    benchmark.pedantic(one_run, rounds=1, iterations=1)
    ratio, sims, bares = paired_ratio(one_run, s.workload.arrival_s, rounds=3)
    benchmark.extra_info.update({"requests": n, "sim_req_per_s": sims, "bare_req_per_s": bares, "ratio": ratio})
    print(f"\ntierlab {statistics.median(sims):,.0f} req/s, bare SimPy {statistics.median(bares):,.0f} req/s,"
          f" median paired ratio {ratio:.2f} ({_verdict(ratio)})")
    assert all(r.summary["requests"] == n for r in results)
    assert ratio >= MIN_RATIO


def test_one_day_million_request_replay(benchmark):
    """conf workload=replay_1m: ServeGen deepseek-r1, one day, ~1.0M requests, 73 deployments."""
    s = build(config("workload=replay_1m", "output.plots=false"))
    n = len(s.workload)
    assert 0.95e6 < n < 1.05e6
    results = []

    def one_run():
        results.append(simulate(s.cluster, s.models, s.engine, s.policy, s.workload))

    ratio, _, bares = benchmark.pedantic(paired_ratio, args=(one_run, s.workload.arrival_s, 1), rounds=1,
                                         iterations=1)
    summary = results[0].summary
    benchmark.extra_info.update({"requests": n, "sim_wall_s": summary["wall_s"], "ratio": ratio})
    print(f"\n1M replay: {n:,} requests, {summary['sim_s']:.0f} s simulated in {summary['wall_s']:.1f} s wall "
          f"({summary['requests_per_wall_s']:,.0f} req/s); bare SimPy {bares[0]:,.0f} req/s; ratio {ratio:.2f}"
          f" ({_verdict(ratio)})")
    assert summary["completed"] + summary["rejected"] + summary["failed"] == n
    assert ratio >= MIN_RATIO
