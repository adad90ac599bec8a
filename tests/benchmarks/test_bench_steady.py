"""The fast steady-state mode (`World(steady_state="fast")`, sim/steady_state.py) against the exact one, timed
in the same run: paired rounds (exact, fast) on the same scenario, process CPU time (less moved than wall
time by other jobs on a shared 2-core machine), the median of the per-round ratios.

Scenario: ServeGen m-small, first 2 hours at 1% of its rate (conf/workload/servegen_m_small.yaml as shipped,
~51k requests, ~99% of them warm with room: the fast path). Measured here 1.4-1.5x (CPU time), the fast
path taking ~99% of the requests. What is left per request in both modes is the policy's own work on every
arrival (observe, place), the request's bookkeeping and one event for its end: the fast mode removes the
fluid batch's first-token event, its re-rating and its end checks, not those.

What the fast mode saves is judged twice:
- by work, which no machine moves: the SimPy events each mode schedules per request (exact 3.40, fast 1.54 on
  this scenario). A fast mode that no longer skips the batch's events fails MAX_EVENT_SHARE;
- by CPU time, which machines move: the CI machine (stop of 2026-12-03, c925140) measured exact 56k and fast
  62k req/CPU-s, 1.10x, where this 2-core machine measures 41k and 58k, 1.36-1.50x, in the same order of the
  same suite. The floor MIN_SPEEDUP = 1.0 therefore only fails a fast mode that costs more than the exact one;
  the speed-up itself is printed and kept in the benchmark's extra_info.
It also prints the fast mode's error on the headline metrics, judged in tests/test_steady_state.py.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any

from experiments.setup import build
from sim.initial import seed_tiers
from sim.run import collect
from sim.world import World
from tests.conftest import config

SCENARIO = ("scenario=serverless", "workload=servegen_m_small", "output.plots=false")
ROUNDS = 5
MIN_SPEEDUP = 1.0
MAX_EVENT_SHARE = 0.6  # fast's events per request over exact's; measured 0.45


def events_scheduled(world: World) -> int:
    """How many events the world's SimPy environment has scheduled (its event-id counter; read after the run)."""
    return next(world.env._eid)  # SimPy numbers every scheduled event from one counter and has no public getter


def _one(cfg: dict[str, Any], mode: str) -> tuple[float, World, dict[str, Any]]:
    """Build afresh (policies keep state), run in `mode`; (CPU seconds of the run, the world, its summary)."""
    s = build(cfg)
    w = World(s.cluster, s.models, s.engine, s.policy, measured=s.measured, steady_state=mode,
              request_timeout_s=s.sim.get("request_timeout_s", 600.0),
              drain_timeout_s=s.sim.get("drain_timeout_s", 3600.0))
    seed_tiers(w, s.initial_state)
    wl = s.workload
    gc.collect()
    c0 = time.process_time()
    w.run(wl.arrival_s, wl.model, wl.tenant, wl.prompt_tokens, wl.output_tokens, progress_every=10**9)
    cpu_s = time.process_time() - c0
    return cpu_s, w, collect(w, s.models, s.cluster, cpu_s, s.sim.get("ttft_slo_s", 10.0), s.policy.name).summary


def _paired(cfg: dict[str, Any]) -> dict[str, Any]:
    ratios, cpu = [], {"exact": [], "fast": []}
    for _ in range(ROUNDS):
        ex_s, ew, ex = _one(cfg, "exact")
        fa_s, w, fa = _one(cfg, "fast")
        cpu["exact"].append(ex_s)
        cpu["fast"].append(fa_s)
        ratios.append(ex_s / fa_s)
    assert w.steady is not None
    return {"speedup": statistics.median(ratios), "cpu_s": cpu, "aggregated": w.steady.aggregated,
            "requests": fa["requests"], "exact": ex, "fast": fa,
            "events": {"exact": events_scheduled(ew), "fast": events_scheduled(w)}}


def _rel(a: float, b: float) -> str:
    return f"{(b - a) / a * 100:+.1f}%" if a else "n/a"


def test_fast_steady_state_is_faster_than_exact_in_the_same_run(benchmark):
    out = benchmark.pedantic(_paired, args=(config(*SCENARIO),), rounds=1, iterations=1)
    n, agg = out["requests"], out["aggregated"]
    ex, fa = out["exact"], out["fast"]
    ev = {m: c / n for m, c in out["events"].items()}
    benchmark.extra_info.update({"speedup_cpu": out["speedup"], "aggregated": agg, "requests": n,
                                 "events_per_request": ev})
    med = {m: statistics.median(v) for m, v in out["cpu_s"].items()}
    print(f"\nsteady state: {n:,} requests, exact {n / med['exact']:,.0f} req/CPU-s, fast {n / med['fast']:,.0f}"
          f" req/CPU-s, speed-up {out['speedup']:.2f}x (median of {ROUNDS} paired rounds; floor {MIN_SPEEDUP});"
          f" events per request exact {ev['exact']:.2f}, fast {ev['fast']:.2f} (share {ev['fast'] / ev['exact']:.2f},"
          f" at most {MAX_EVENT_SHARE});"
          f" fast path {agg / n:.1%}; fast vs exact: cold starts {_rel(ex['cold_starts'], fa['cold_starts'])},"
          f" mean cold start {_rel(ex['cold_start_s']['mean'], fa['cold_start_s']['mean'])},"
          f" TTFT p50 {_rel(ex['ttft_s']['p50'], fa['ttft_s']['p50'])},"
          f" p99 {_rel(ex['ttft_s']['p99'], fa['ttft_s']['p99'])}, cost {_rel(ex['cost_usd'], fa['cost_usd'])}")
    assert agg > 0.9 * n  # the fast path is what ran
    assert ev["fast"] <= MAX_EVENT_SHARE * ev["exact"]  # and it skipped the batch's events
    assert out["speedup"] >= MIN_SPEEDUP
