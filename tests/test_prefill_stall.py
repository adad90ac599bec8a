"""EngineSpec.prefill_stalls_decode: with mixed prefill / decode forward passes (the CPU engine, vLLM-style
schedulers) the running sequences' decoding stands still while the instance prefills a newcomer; without it
(the default) decoding and prefills overlap, as before, bit for bit."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest
import simpy

from core.catalog import architecture
from core.inference import InferenceModel, MeasuredTable
from core.spec_builders import cluster_from_dict, engine_from_dict
from core.state import InstanceState
from experiments.simulate import run
from sim.engine import SimEngine
from sim.request import Request
from tests.conftest import config

_CFG = config("cluster=small")
NODE = cluster_from_dict(_CFG["cluster"]).nodes[0]
ENGINE = engine_from_dict(_CFG["engine"])
M1 = architecture("llama-3.2-1b")
IT = 0.01  # a flat decode step: the batch size does not change the token clock's rate
FLAT = (MeasuredTable(ENGINE.name, M1.name, NODE.gpu.name, 1000.0, (1, 64), (IT, IT)),)  # prefill 1 ms/token


def _serve(stall: bool, reqs: list[tuple[float, int, int]]) -> list[Request]:
    """(arrival, prompt, output) requests on one ready instance; every request, finished."""
    env = simpy.Environment()
    state = InstanceState("i0", M1, NODE.name, (0,), M1.weights_bytes, 1e12, 64, "dram", 0.0)
    state.status = "ready"
    done: list[Request] = []
    spec = dataclasses.replace(ENGINE, prefill_stalls_decode=stall)
    eng = SimEngine(env, state, InferenceModel(M1, NODE.gpu, 1, spec, FLAT), done.append)
    rs = [Request(i, M1.name, "t", p, o, a, math.inf) for i, (a, p, o) in enumerate(reqs)]

    def arrive(r: Request):
        yield env.timeout(r.arrival_s)
        r.instance = eng
        eng.submit(r)

    for r in rs:
        env.process(arrive(r))
    env.run()
    assert len(done) == len(rs)
    return rs


def test_a_newcomers_prefill_delays_the_running_sequence_by_its_length() -> None:
    reqs = [(0.0, 10, 101), (0.3, 200, 2), (0.6, 400, 2)]  # A decodes 100 steps (1 s); B, C prefill 0.2 s, 0.4 s
    overlap, stall = _serve(False, reqs), _serve(True, reqs)
    a0, a1 = overlap[0], stall[0]
    assert a0.finish_s - a0.first_token_s == pytest.approx(100 * IT, rel=1e-9)
    assert a1.finish_s - a1.first_token_s == pytest.approx(100 * IT + 0.2 + 0.4, rel=1e-9)
    # the newcomers themselves: same first token either way (their prefill is what the others wait for)
    for o, s in zip(overlap[1:], stall[1:], strict=True):
        assert s.first_token_s == pytest.approx(o.first_token_s, rel=1e-12)
    # B decodes its one step after its prefill, but C's prefill (0.6-1.0 s) stalls it only if it overlaps
    assert stall[1].finish_s == pytest.approx(overlap[1].finish_s, rel=1e-12)


def test_back_to_back_prefills_stall_once_each() -> None:
    reqs = [(0.0, 10, 51), (0.1, 100, 2), (0.1, 100, 2), (0.1, 100, 2)]  # three 0.1 s prefills in a row
    a = _serve(True, reqs)[0]
    assert a.finish_s - a.first_token_s == pytest.approx(50 * IT + 3 * 0.1, rel=1e-9)


def test_default_is_the_simulator_as_before_and_stalls_slow_a_real_run() -> None:
    base = run(config("cluster=small", "workload.max_requests=800"), None)
    off = run(config("cluster=small", "workload.max_requests=800", "+engine.prefill_stalls_decode=false"), None)
    for x, y in ((base.requests, off.requests), (base.moves, off.moves), (base.instances, off.instances)):
        pd.testing.assert_frame_equal(x, y, check_exact=True)
    on = run(config("cluster=small", "workload.max_requests=800", "+engine.prefill_stalls_decode=true"), None)
    again = run(config("cluster=small", "workload.max_requests=800", "+engine.prefill_stalls_decode=true"), None)
    pd.testing.assert_frame_equal(on.requests, again.requests, check_exact=True)  # deterministic
    done = (base.requests["outcome"] == "completed") & (on.requests["outcome"] == "completed")
    assert (on.requests.loc[done, "tpot_s"] >= base.requests.loc[done, "tpot_s"] - 1e-12).mean() > 0.95
    assert on.requests.loc[done, "tpot_s"].mean() > base.requests.loc[done, "tpot_s"].mean()
