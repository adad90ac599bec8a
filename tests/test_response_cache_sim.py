"""The simulator's response cache (core.response_cache_model in sim.world): hits only when on, answered
without a GPU, costs fall; off (the default) changes nothing."""

from __future__ import annotations

import pandas as pd
import pytest

from core.response_cache import CacheConfig
from core.response_cache_model import SimCacheConfig
from experiments.response_cache import ONE_MODEL, trace_repeats
from experiments.setup import build
from sim.run import simulate
from tests.conftest import config


def _sim(s, rc: SimCacheConfig | None = None, **kw):
    return simulate(s.cluster, s.models, s.engine, s.policy, s.workload, response_cache=rc, **kw)


@pytest.fixture(scope="module")
def azure():
    return build(config("workload.max_requests=3000"))


def test_hit_rate_model_where_the_trace_has_no_prompt_identity(azure) -> None:
    assert azure.workload.prefix_blocks is None  # the Azure trace: no prompt identity, only the model applies
    off = _sim(azure)
    on = _sim(azure, SimCacheConfig(CacheConfig(exact=True), exact_hit_rate=0.3, gateway_latency_s=0.005))
    req = on.requests
    hits = req[req["cache"] != ""]
    assert set(off.requests["cache"]) == {""} and "response_cache" not in off.summary
    assert 0.25 < len(hits) / len(req) < 0.35 and set(hits["cache"]) == {"exact"}
    assert (hits["outcome"] == "completed").all() and (hits["instance"] == "").all()
    assert (hits["cost_usd"] == 0).all() and ((hits["e2e_s"] - 0.005).abs() < 1e-9).all()
    assert ((hits["ttft_s"] - 0.005).abs() < 1e-9).all() and hits["tpot_s"].isna().all()
    s = on.summary["response_cache"]
    assert s["hits"] == len(hits) and s["modelled"]["exact"] == len(hits)
    assert on.summary["cost_usd"] < off.summary["cost_usd"]
    assert on.summary["ttft_s"]["mean"] < off.summary["ttft_s"]["mean"]


def test_cache_off_or_disabled_leaves_every_record_as_it_was(azure) -> None:
    base = _sim(azure)
    disabled = _sim(azure, SimCacheConfig(CacheConfig(), exact_hit_rate=0.9))
    pd.testing.assert_frame_equal(base.requests, disabled.requests)
    assert base.summary["cost_usd"] == disabled.summary["cost_usd"]


def test_exact_hits_from_the_traces_prompt_identity() -> None:
    s = build(config("workload=mooncake", *ONE_MODEL))
    assert s.workload.prefix_blocks is not None
    on = _sim(s, SimCacheConfig(CacheConfig(exact=True)))
    off = _sim(s)
    n, repeats = trace_repeats()
    hits = int((on.requests["cache"] == "exact").sum())
    assert 0 < hits <= repeats and on.summary["response_cache"]["modelled"] == {"exact": 0, "semantic": 0}
    assert (off.requests["cache"] == "").all() and on.summary["cost_usd"] <= off.summary["cost_usd"]
    # per tenant: the same trace under two tenants alternately shares nothing across them
    tenants = s.workload.with_columns(tenant=pd.Series(["t0", "t1"] * (n // 2 + 1))[:n].to_numpy(dtype=object))
    split = simulate(s.cluster, s.models, s.engine, s.policy, tenants, response_cache=SimCacheConfig(
        CacheConfig(exact=True)))
    assert int((split.requests["cache"] == "exact").sum()) < hits


def test_the_simulate_command_reads_the_response_cache_from_its_config() -> None:
    """`python -m experiments.simulate response_cache='{...}'`: the config key reaches the world (the same
    hits as the API), null is off, and a bad key is an error naming `response_cache`."""
    from core.errors import ConfigError
    from experiments.simulate import run

    cfg = config("workload.max_requests=3000")
    assert cfg["response_cache"] is None
    off = run(cfg, None)
    on = run({**cfg, "response_cache": {"exact": True, "exact_hit_rate": 0.3, "gateway_latency_s": 0.005}}, None)
    assert "response_cache" not in off.summary and set(off.requests["cache"]) == {""}
    assert 0.25 < on.summary["response_cache"]["hits"] / len(on.requests) < 0.35
    with pytest.raises(ConfigError, match=r"response_cache: unknown keys \['exakt'\]"):
        run({**cfg, "response_cache": {"exakt": True}}, None)
