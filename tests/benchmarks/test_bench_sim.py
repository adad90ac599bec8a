"""Simulator speed: simulated requests per wall-second vs a bare SimPy loop, measured in the same run.

The bare loop is the floor any SimPy model pays: per request one process, one resource
request and one timeout. The ratio (tierlab rate / bare rate) is what is checked, so a
slow or noisy machine slows both sides alike. Target: >= 1/3.
"""

from __future__ import annotations

import time

import numpy as np
import simpy

from experiments.setup import build
from sim.run import simulate
from tests.conftest import config

MIN_RATIO = 1 / 3


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


def test_sim_rate_vs_bare_simpy(benchmark):
    """Scenario: conf workload=servegen_r1 cut to its first 2 hours, medium cluster, seed_tiered.

    Rounds alternate tierlab and the bare loop, and the best of each is compared, so a burst of
    load on the machine hits both sides alike.
    """
    overrides = ("workload=servegen_r1", "workload.window=[0,7200]", "output.plots=false")
    s = build(config(*overrides))
    n = len(s.workload)
    sim_rates, bare_rates = [], []

    def one_run():
        s.policy = build(config(*overrides)).policy  # policies keep per-run state: a fresh one per round
        t0 = time.perf_counter()
        result = simulate(s.cluster, s.models, s.engine, s.policy, s.workload)
        sim_rates.append(n / (time.perf_counter() - t0))
        bare_rates.append(bare_simpy_rate(s.workload.arrival_s))
        return result

    result = benchmark.pedantic(one_run, rounds=3 if benchmark.enabled else 1, iterations=1)
    while len(sim_rates) < 3:
        result = one_run()
    sim_rate, bare = max(sim_rates), max(bare_rates)
    ratio = sim_rate / bare
    benchmark.extra_info.update({"requests": n, "sim_req_per_s": sim_rate, "bare_req_per_s": bare, "ratio": ratio})
    print(f"\ntierlab {sim_rate:,.0f} req/s, bare SimPy {bare:,.0f} req/s, ratio {ratio:.2f}"
          f" (target >= {MIN_RATIO:.2f})")
    assert result.summary["requests"] == n
    assert ratio >= MIN_RATIO


def test_one_day_million_request_replay(benchmark):
    """conf workload=replay_1m: ServeGen deepseek-r1, one day, ~1.0M requests, 73 deployments."""
    s = build(config("workload=replay_1m", "output.plots=false"))
    n = len(s.workload)
    assert 0.95e6 < n < 1.05e6
    result = benchmark.pedantic(lambda: simulate(s.cluster, s.models, s.engine, s.policy, s.workload),
                                rounds=1, iterations=1)
    summary = result.summary
    bare = bare_simpy_rate(s.workload.arrival_s)
    ratio = summary["requests_per_wall_s"] / bare
    benchmark.extra_info.update({"requests": n, "sim_wall_s": summary["wall_s"], "ratio": ratio})
    print(f"\n1M replay: {n:,} requests, {summary['sim_s']:.0f} s simulated in {summary['wall_s']:.1f} s wall "
          f"({summary['requests_per_wall_s']:,.0f} req/s); bare SimPy {bare:,.0f} req/s; ratio {ratio:.2f}")
    assert summary["completed"] + summary["rejected"] + summary["failed"] == n
    assert ratio >= MIN_RATIO
