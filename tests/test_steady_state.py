"""The fast steady-state mode (`sim.steady_state`): warm requests decoded analytically, the rest exact.

Each check runs the real simulator in both modes on the same inputs and compares what they record.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import simpy

from core.catalog import architecture
from core.errors import ConfigError
from core.inference import InferenceModel, MeasuredTable
from core.policies.autoscaling import KeepAlive
from core.policies.base import PolicyBundle
from core.policies.caching import LocalityLru, NoCaching
from core.policies.placement import StartupTime, TierAware
from core.spec_builders import cluster_from_dict, engine_from_dict
from core.specs import EngineSpec
from core.state import InstanceState
from experiments.setup import build
from sim.engine import SimEngine
from sim.initial import seed_tiers
from sim.request import Request
from sim.run import SimResult, collect
from sim.steady_state import SteadyState
from sim.world import World
from tests.conftest import config

B8 = "llama-3.1-8b"
# half an hour of ServeGen m-small at 1% of its rate: ~14k requests, most of them warm
M_SMALL_HALF_HOUR = ("scenario=serverless", "workload=servegen_m_small", "workload.options.end_s=1800")
PREEMPTING = ("cluster=small", "workload.max_requests=1000", "cluster.spot_share=1.0",
              "cluster.preemption_rate_per_hour=4", "cluster.replacement_delay_s=200")


def _configured(overrides: tuple[str, ...], mode: str, seed: int = 0) -> tuple[World, SimResult]:
    """Run a composed config in `mode` (a fresh build each time: policies keep state)."""
    s = build(config(*overrides))
    w = World(s.cluster, s.models, s.engine, s.policy, measured=s.measured, seed=seed, steady_state=mode,
              request_timeout_s=s.sim.get("request_timeout_s", 600.0),
              drain_timeout_s=s.sim.get("drain_timeout_s", 3600.0))
    seed_tiers(w, s.initial_state)
    wl = s.workload
    w.run(wl.arrival_s, wl.model, wl.tenant, wl.prompt_tokens, wl.output_tokens, prefix_blocks=wl.prefix_blocks)
    return w, collect(w, s.models, s.cluster, 1.0, s.sim.get("ttft_slo_s", 10.0), s.policy.name)


def _scripted(mode: str | None, arrivals: list[float], outputs: list[int],
              prompt: int = 500) -> tuple[World, SimResult]:
    """One 8B model on the small cluster, requests at given times (the first one loads it); mode None: the
    World's default."""
    cluster = cluster_from_dict(config("cluster=small")["cluster"])
    policy = PolicyBundle(TierAware(), NoCaching(), KeepAlive(keep_alive_s=600.0), name="t")
    kw = {} if mode is None else {"steady_state": mode}
    w = World(cluster, [architecture(B8)], EngineSpec(), policy, **kw)
    n = len(arrivals)
    w.run(np.asarray(arrivals, dtype=float), [B8] * n, ["t"] * n, np.full(n, prompt), np.asarray(outputs))
    return w, collect(w, list(w.state.models.values()), w.cluster, 1.0, 10.0, "t")


OVERLAPPING = ([0.0, 100.0, 100.5, 101.0, 101.2, 103.0], [50, 2000, 1500, 800, 1, 600])


def test_exact_is_the_default_and_records_what_the_fluid_batch_computes():
    w, res = _scripted(None, *OVERLAPPING)
    assert w.steady is None  # no fast path can be taken
    _, exact = _scripted("exact", *OVERLAPPING)
    _, fast = _scripted("fast", *OVERLAPPING)
    pd.testing.assert_frame_equal(res.requests, exact.requests)
    # the switch matters on this input (else the comparison above would prove nothing)
    assert not np.allclose(fast.requests["e2e_s"], exact.requests["e2e_s"])


def test_a_lone_warm_request_ends_exactly_when_the_batch_would_end_it():
    """Batch of one: the frozen rate is the true rate, so fast and exact agree to rounding."""
    _, ex = _scripted("exact", [0.0, 100.0], [200, 300])
    fa_w, fa = _scripted("fast", [0.0, 100.0], [200, 300])
    assert fa_w.steady is not None and fa_w.steady.aggregated == 1  # the first waited for the load: exact path
    assert not fa.requests["cold_start"].iloc[1] and fa.requests["cold_start"].iloc[0]
    for col in ("ttft_s", "e2e_s", "tpot_s", "prefill_s", "queue_s"):
        np.testing.assert_allclose(fa.requests[col], ex.requests[col], rtol=1e-9, err_msg=col)
    pd.testing.assert_frame_equal(fa.instances, ex.instances)


def test_overlapping_warm_requests_share_the_batch_approximately():
    _, ex = _scripted("exact", *OVERLAPPING)
    fa_w, fa = _scripted("fast", *OVERLAPPING)
    assert fa_w.steady is not None and fa_w.steady.aggregated == 5
    # prefills are serialised and do not depend on decoding: the first tokens are exact
    np.testing.assert_allclose(fa.requests["ttft_s"], ex.requests["ttft_s"], rtol=1e-9)
    # a one-token answer has no decode at all
    assert fa.requests["e2e_s"].iloc[4] == pytest.approx(ex.requests["e2e_s"].iloc[4], rel=1e-9)
    # the decode rate frozen at admission: later joins do not slow the early ones, so they end early, and
    # the batch they joined is counted (a lone sequence would be faster still)
    err = (fa.requests["e2e_s"] - ex.requests["e2e_s"]) / ex.requests["e2e_s"]
    assert err.abs().max() < 0.1
    assert err.iloc[1] < 0  # the first warm one was admitted alone and then shared the batch
    assert (fa.requests["outcome"] == "completed").all()


def test_fast_mode_on_half_an_hour_of_m_small_stays_within_five_percent_of_exact():
    _, ex = _configured(M_SMALL_HALF_HOUR, "exact")
    fa_w, fa = _configured(M_SMALL_HALF_HOUR, "fast")
    n = fa.summary["requests"]
    assert fa_w.steady is not None and fa_w.steady.aggregated > 0.9 * n  # the fast path is what ran
    a, b = ex.summary, fa.summary
    assert a["requests"] == n and a["completed"] + a["rejected"] == b["completed"] + b["rejected"]
    for key in ("cold_starts", "instances_started", "cost_usd"):
        assert b[key] == pytest.approx(a[key], rel=0.05), key
    for key, q in (("cold_start_s", "mean"), ("ttft_s", "p50"), ("ttft_s", "p99"), ("e2e_s", "p50")):
        assert b[key][q] == pytest.approx(a[key][q], rel=0.05), (key, q)
    # and it is an approximation, not the same computation under another name
    assert not np.allclose(fa.requests["e2e_s"], ex.requests["e2e_s"], equal_nan=True)


def test_fast_mode_survives_preemptions_and_requeues():
    w, res = _configured(PREEMPTING, "fast")
    s = res.summary
    assert s["preemptions"] >= 1 and s["requeued"] >= 1
    assert w.steady is not None and w.steady.aggregated > 0
    assert s["completed"] + s["rejected"] + s["failed"] == s["requests"]
    done = res.requests[res.requests["outcome"] == "completed"]
    assert (done["e2e_s"] >= done["ttft_s"]).all() and (done["ttft_s"] > 0).all()


def _migrating(mode: str) -> World:
    """tests/test_migration.py's scenario with A's long answer arriving warm: B's arrival migrates A's instance."""
    cfg = config("cluster=small")["cluster"]
    cfg["node_groups"][0]["n_gpus"] = 1
    a, b = architecture("llama-3.1-8b", "A"), architecture("llama-3.1-8b", "B")
    engine = EngineSpec(kv_reserve_frac=2.0, compile_s=0.0, process_start_s=1.0, graph_capture_s=0.5)
    policy = PolicyBundle(StartupTime(migration=True), LocalityLru(), KeepAlive(keep_alive_s=600), name="sllm")
    w = World(cluster_from_dict(cfg), [a, b], engine, policy, steady_state=mode)
    for node, models in (("h100-0", ("A", "B")), ("h100-1", ("A",))):
        dram = w.state.nodes[node].tiers["dram"]
        for m in models:
            dram.reserve(m, a.weights_bytes)
            dram.commit(m, 0.0)
    # A's first request loads it; the second, warm, decodes 4000 tokens and is still at it when B arrives
    w.run(np.array([0.0, 20.0, 30.0]), ["A", "A", "B"], ["t"] * 3, np.full(3, 500), np.array([20, 4000, 50]))
    return w


def test_a_migrated_instance_hands_its_analytic_sequence_over():
    ex, fa = _migrating("exact"), _migrating("fast")
    assert fa.steady is not None and fa.steady.aggregated == 1
    assert "migrated" in [r[9] for r in fa.instance_rows if r[4] == "stopped"]
    warm = fa.requests[1]
    assert warm.outcome == "completed" and warm.node == "h100-1"  # finished where it was handed over to
    # a batch of one: nothing to approximate, so the handover lands where the exact mode's does
    for e, f in zip(ex.requests, fa.requests, strict=True):
        assert (f.node, f.outcome) == (e.node, e.outcome)
        assert f.finish_s == pytest.approx(e.finish_s, rel=1e-9)


def test_a_bad_mode_names_the_key():
    with pytest.raises(ConfigError, match="steady_state"):
        _scripted("quick", [0.0], [10])


# ------------------------------------------------------------------ one engine, a flat decode step
# With a decode step that does not depend on the batch, freezing a sequence's rate is no approximation at all:
# the fast mode must then reproduce the fluid batch to rounding, through migrations and losses too.
_CFG = config("cluster=small")
NODE = cluster_from_dict(_CFG["cluster"]).nodes[0]
ENGINE = engine_from_dict(_CFG["engine"])
M1 = architecture("llama-3.2-1b")
IT = 0.01
FLAT = (MeasuredTable(ENGINE.name, M1.name, NODE.gpu.name, 1000.0, (1, 64), (IT, IT)),)  # prefill 1 ms/token
# (arrival, prompt, output): overlapping decodes, a one-token answer, one still in prefill at t = 1.0
REQS = [(0.0, 10, 300), (0.2, 50, 150), (0.5, 20, 1), (0.6, 100, 400), (0.95, 200, 80)]


def _engine(env: simpy.Environment, name: str, steady: SteadyState | None, done: list[Request]) -> SimEngine:
    state = InstanceState(name, M1, NODE.name, (0,), M1.weights_bytes, 1e12, 64, "dram", 0.0)
    state.status = "ready"
    return SimEngine(env, state, InferenceModel(M1, NODE.gpu, 1, ENGINE, FLAT), done.append, steady=steady)


def _flat(fast: bool, event: str = "", at_s: float = 1.0) -> tuple[list[Request], list[float], SimEngine]:
    """REQS on one ready engine; at `at_s`, `event` "migrate" (to a second engine) or "abort"."""
    env = simpy.Environment()
    done: list[Request] = []
    steady = SteadyState() if fast else None
    src, dest = _engine(env, "src", steady, done), _engine(env, "dest", steady, done)
    rs = [Request(i, M1.name, "t", p, o, a, math.inf) for i, (a, p, o) in enumerate(REQS)]
    drained: list[float] = []

    def arrive(r: Request):
        yield env.timeout(r.arrival_s)
        r.instance = src
        src.submit(r)

    def act():
        yield env.timeout(at_s)
        if event == "migrate":
            src.migrate_to(dest, 2e-4, 0.05, lambda: drained.append(env.now))
        elif event == "abort":
            for r in rs:
                if r.instance is src and r not in done:
                    r.instance = None  # the world takes them away first (`World._requeue`)
            src.abort()

    for r in rs:
        env.process(arrive(r))
    env.process(act())
    env.run()
    if fast:
        assert steady is not None and steady.aggregated == len(REQS)
    return rs, drained, src


@pytest.mark.parametrize("event", ["", "migrate"])
def test_with_a_flat_decode_step_fast_and_exact_agree_through_a_migration(event):
    exact, ex_drained, _ = _flat(False, event)
    fast, fa_drained, src = _flat(True, event)
    for e, f in zip(exact, fast, strict=True):
        assert (f.first_token_s, f.instance.state.id) == pytest.approx((e.first_token_s, e.instance.state.id))
        assert f.finish_s == pytest.approx(e.finish_s, rel=1e-9), f.id
    assert fa_drained == pytest.approx(ex_drained, rel=1e-9)
    if event:
        assert len(fa_drained) == 1 and {r.instance.state.id for r in fast if r.output_tokens > 1} == {"dest"}
    assert src.state.active == 0 and src._n_fast == 0 and not src._fast


def test_an_aborted_engine_ends_none_of_its_analytic_sequences():
    rs, _, src = _flat(True, "abort")
    ended = [r for r in rs if r.finish_s == r.finish_s]  # not NaN
    assert ended and all(r.finish_s <= 1.0 for r in ended)  # those done before the loss, none after it
    assert len(ended) < len(rs)
    assert src.state.active == 0 and src.state.kv_used_bytes == 0 and src._n_fast == 0 and not src._fast


@pytest.mark.parametrize("change", [{"prefix_cache": True}, {"prefill_stalls_decode": True}])
def test_engines_whose_timing_the_frozen_rate_would_miss_stay_exact(change):
    env = simpy.Environment()
    steady = SteadyState()
    state = InstanceState("i0", M1, NODE.name, (0,), M1.weights_bytes, 1e12, 64, "dram", 0.0)
    state.status = "ready"
    spec = dataclasses.replace(ENGINE, **change)
    done: list[Request] = []
    eng = SimEngine(env, state, InferenceModel(M1, NODE.gpu, 1, spec, FLAT), done.append, engine=spec, steady=steady)
    r = Request(0, M1.name, "t", 100, 50, 0.0, math.inf)
    r.instance = eng
    eng.submit(r)
    env.run()
    assert eng.steady is None and steady.aggregated == 0 and done == [r]


def test_the_simulate_command_switches_the_mode_with_sim_steady_state() -> None:
    """`python -m experiments.simulate sim.steady_state=fast`: the key reaches the world (requests aggregated,
    counted in the summary), exact is the default and reports nothing, and a bad mode names the key."""
    from experiments.simulate import run
    from tests.conftest import config

    cfg = config("workload.max_requests=3000")
    assert cfg["sim"]["steady_state"] == "exact"
    exact = run(cfg, None)
    fast = run({**cfg, "sim": {**cfg["sim"], "steady_state": "fast"}}, None)
    assert "steady_state_aggregated" not in exact.summary
    assert 0 < fast.summary["steady_state_aggregated"] <= fast.summary["completed"]
    assert fast.summary["requests"] == exact.summary["requests"]
    with pytest.raises(ConfigError, match=r"sim\.steady_state must be one of exact, fast"):
        run({**cfg, "sim": {**cfg["sim"], "steady_state": "quick"}}, None)
