"""EngineSpec.step_overhead_s / request_overhead_s: zero reproduces the simulator exactly, non-zero adds
closed-form amounts (one step overhead per forward pass, one request overhead per time to first token)."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest
import simpy

from core.catalog import architecture
from core.errors import ConfigError
from core.inference import InferenceModel, MeasuredTable, measured_from_dict
from core.spec_builders import cluster_from_dict, engine_from_dict
from core.state import InstanceState
from experiments.simulate import run
from sim.engine import SimEngine
from sim.request import Request
from tests.conftest import config

_CFG = config("cluster=small", "inference=measured_example")
NODE = cluster_from_dict(_CFG["cluster"]).nodes[0]
ENGINE = engine_from_dict(_CFG["engine"])
MEASURED = tuple(measured_from_dict(m, f"inference.measured[{i}]") for i, m in enumerate(_CFG["inference"]["measured"]))
M1 = architecture("llama-3.2-1b")


def _frames(*overrides: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    res = run(config("cluster=small", "workload.max_requests=1500", *overrides), None)
    return res.requests, res.moves, res.instances, res.summary


def test_zero_overheads_reproduce_the_default_run_exactly():
    a = _frames()
    b = _frames("+engine.step_overhead_s=0.0", "+engine.request_overhead_s=0.0")
    for x, y in zip(a[:3], b[:3], strict=True):
        pd.testing.assert_frame_equal(x, y, check_exact=True)
    assert {k: v for k, v in a[3].items() if "wall" not in k} == {k: v for k, v in b[3].items() if "wall" not in k}


def test_nonzero_overheads_move_the_default_run():
    base = _frames()[0]
    slow = _frames("+engine.step_overhead_s=0.01", "+engine.request_overhead_s=0.05")[0]
    assert not base["ttft_s"].equals(slow["ttft_s"])
    # placement and cold starts react to the slower engine, so no pairwise claim; but no request can beat
    # the fixed costs of its first token (request overhead + one prefill pass)
    done = slow["outcome"] == "completed"
    assert (slow.loc[done, "ttft_s"] >= 0.05 + 0.01 - 1e-9).all()
    assert (base.loc[base["outcome"] == "completed", "ttft_s"] < 0.06).any()


@pytest.mark.parametrize("field", ["step_overhead_s", "request_overhead_s"])
@pytest.mark.parametrize("bad", [-0.001, math.inf, math.nan, "x"])
def test_overheads_are_validated_naming_the_field(field: str, bad: object):
    with pytest.raises(ConfigError, match=field):
        engine_from_dict({**_CFG["engine"], field: bad})


@pytest.mark.parametrize("measured", [(), MEASURED], ids=["roofline", "measured"])
def test_inference_model_adds_one_step_overhead_per_pass(measured):
    step = 0.004
    plain = InferenceModel(M1, NODE.gpu, 1, ENGINE, measured)
    over = InferenceModel(M1, NODE.gpu, 1, dataclasses.replace(ENGINE, step_overhead_s=step), measured)
    for tokens in (1, 100, 2000):
        assert over.prefill_s(tokens) == pytest.approx(plain.prefill_s(tokens) + step, abs=1e-15)
    for batch in (1, 4, 64):
        ctx = batch * 300.0
        assert over.decode_iter_s(batch, ctx) == pytest.approx(plain.decode_iter_s(batch, ctx) + step, abs=1e-15)


def _engine(engine_spec, measured=()) -> tuple[simpy.Environment, SimEngine, list[Request]]:
    env = simpy.Environment()
    state = InstanceState("i0", M1, NODE.name, (0,), M1.weights_bytes, 1e12, 64, "dram", 0.0)
    state.status = "ready"
    done: list[Request] = []
    eng = SimEngine(env, state, InferenceModel(M1, NODE.gpu, 1, engine_spec, measured), done.append)
    return env, eng, done


def _serve(engine_spec, reqs: list[tuple[int, int]], measured=()) -> list[Request]:
    """Submit every (prompt, output) request at t=0 to one instance; the finished requests in id order."""
    env, eng, done = _engine(engine_spec, measured)
    rs = [Request(i, M1.name, "t", p, o, 0.0, math.inf) for i, (p, o) in enumerate(reqs)]
    for r in rs:
        r.instance = eng
        eng.submit(r)
    env.run()
    assert len(done) == len(rs)
    return rs


@pytest.mark.parametrize("measured", [(), MEASURED], ids=["roofline", "measured"])
def test_single_request_closed_form(measured):
    """TTFT = request + step overhead + prefill; decode = (output - 1) x (iteration + step overhead)."""
    step, req_over, prompt, out = 0.003, 0.05, 200, 33
    inf = InferenceModel(M1, NODE.gpu, 1, ENGINE, measured)
    (base,) = _serve(ENGINE, [(prompt, out)], measured)
    (slow,) = _serve(dataclasses.replace(ENGINE, step_overhead_s=step, request_overhead_s=req_over),
                     [(prompt, out)], measured)
    assert base.first_token_s == pytest.approx(inf.prefill_s(prompt), rel=1e-12)
    assert slow.first_token_s == pytest.approx(base.first_token_s + req_over + step, rel=1e-12)
    base_decode = base.finish_s - base.first_token_s
    slow_decode = slow.finish_s - slow.first_token_s
    assert slow_decode == pytest.approx(base_decode + (out - 1) * step, rel=1e-9)


def test_request_overhead_alone_shifts_ttft_and_e2e_exactly():
    req_over = 0.07
    reqs = [(100, 10), (300, 20), (50, 5)]
    base = _serve(ENGINE, reqs, MEASURED)
    slow = _serve(dataclasses.replace(ENGINE, request_overhead_s=req_over), reqs, MEASURED)
    # prefills still run back to back (the overhead is outside the batch); every TTFT moves by exactly it
    for b, s in zip(base, slow, strict=True):
        assert s.prefill_start_s == b.prefill_start_s
        assert s.first_token_s - b.first_token_s == pytest.approx(req_over, abs=1e-12)


def test_small_batch_step_overhead_slows_the_token_clock():
    """Four requests decoding together at a flat measured step time: every sequence's decode takes
    (output - 1) x (iteration + step overhead), i.e. the overhead is paid once per shared step, not per sequence."""
    step, it, prompt, out = 0.002, 0.01, 64, 41
    flat = (MeasuredTable(ENGINE.name, M1.name, NODE.gpu.name, 5000.0, (1, 64), (it, it)),)
    reqs = [(prompt, out)] * 4
    base = _serve(ENGINE, reqs, flat)
    slow = _serve(dataclasses.replace(ENGINE, step_overhead_s=step), reqs, flat)
    for i, (b, s) in enumerate(zip(base, slow, strict=True)):
        # the prefills are serialised: the i-th waits for i passes before its own, each one overhead longer
        assert s.first_token_s - b.first_token_s == pytest.approx((i + 1) * step, abs=1e-12)
        assert b.finish_s - b.first_token_s == pytest.approx((out - 1) * it, rel=1e-9)
        assert s.finish_s - s.first_token_s == pytest.approx((out - 1) * (it + step), rel=1e-9)
