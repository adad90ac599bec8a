"""Invariants under random workloads, catalogs and tier sizes (hypothesis)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.catalog import variants
from core.loadtime import progressive_first_token_s
from core.spec_builders import cluster_from_dict
from core.specs import EngineSpec
from core.workload.generators import gamma
from core.workload.models import assign_models
from experiments.setup import build_policy
from sim.run import simulate
from tests.conftest import config

POLICIES = ("mvp", "seed_tiered", "sllm", "predictive")


def _cluster(dram_gb: float, nvme_gb: float, sata_gb: float, nodes: int, gpus: int):
    cfg = config("cluster=small")["cluster"]
    g = cfg["node_groups"][0]
    g["count"], g["n_gpus"] = nodes, gpus
    g["tiers"]["dram"]["capacity_bytes"] = dram_gb * 1e9
    g["tiers"]["nvme"]["capacity_bytes"] = nvme_gb * 1e9
    g["tiers"]["sata"]["capacity_bytes"] = sata_gb * 1e9
    return cluster_from_dict(cfg)


def _check_tier_occupancy(moves: pd.DataFrame, cluster) -> None:
    """Replay every tier movement in time order: never over capacity, never a model twice in a tier."""
    cap = {(n.name, t.name): t.capacity_bytes for n in cluster.nodes for t in n.tiers.values()}
    held: dict[tuple[str, str], dict[str, float]] = {k: {} for k in cap}
    events = []
    for r in moves.itertuples(index=False):
        if r.kind == "evict":
            events.append((r.time_s, 0, "out", r.node, r.from_tier, r.model, r.bytes))
        else:
            # space is reserved from the start of the copy until it lands
            events.append((r.time_s, 1, "in", r.node, r.to_tier, r.model, r.bytes))
    for _t, _o, kind, node, tier, model, nbytes in sorted(events):
        h = held[(node, tier)]
        if kind == "in":
            assert model not in h, f"{model} twice in {node}/{tier}"
            h[model] = nbytes
            assert sum(h.values()) <= cap[(node, tier)] + 1e-6, f"{node}/{tier} over capacity"
        else:
            assert model in h
            del h[model]


def _check_layers_resident(requests: pd.DataFrame, instances: pd.DataFrame, progressive: bool) -> None:
    resident = instances[instances["event"] == "weights_resident"].set_index("instance")["time_s"]
    ready = instances[instances["event"] == "ready"].set_index("instance")["time_s"]
    done = requests[requests["outcome"] == "completed"]
    first_token = done["arrival_s"] + done["ttft_s"]
    assert (first_token.to_numpy() >= done["instance"].map(resident).to_numpy() - 1e-9).all()
    if not progressive:
        # without progressive loading, prefill starts only once the engine is ready
        start = first_token - done["prefill_s"]
        assert (start.to_numpy() >= done["instance"].map(ready).to_numpy() - 1e-6).all()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(POLICIES),
    rate=st.floats(0.2, 6.0),
    cv=st.floats(0.5, 6.0),
    zipf=st.floats(0.0, 2.0),
    dram=st.floats(20, 400),
    nvme=st.floats(20, 2000),
    sata=st.floats(20, 4000),
    nodes=st.integers(1, 3),
    gpus=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 10_000),
)
def test_invariants_hold_on_random_worlds(policy, rate, cv, zipf, dram, nvme, sata, nodes, gpus, seed):
    cluster = _cluster(dram, nvme, sata, nodes, gpus)
    models = variants(["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"], 3, seed)
    wl = gamma(rate, cv, 900.0, seed)
    wl = assign_models(wl, [m.name for m in models], zipf, seed)
    bundle = build_policy(config(f"policy={policy}")["policy"])
    res = simulate(cluster, models, EngineSpec(), bundle, wl, request_timeout_s=300, drain_timeout_s=1800)
    req = res.requests
    assert len(req) == len(wl)
    assert req["outcome"].isin(["completed", "rejected", "failed"]).all()
    s = res.summary
    assert s["completed"] + s["rejected"] + s["failed"] == s["requests"]
    _check_tier_occupancy(res.moves, cluster)
    _check_layers_resident(req, res.instances, bundle.progressive)


@given(
    arrivals=st.lists(st.floats(0, 100), min_size=1, max_size=40),
    compute=st.floats(0.0, 5.0),
    start=st.floats(0, 100),
)
def test_progressive_pass_never_computes_a_missing_layer(arrivals, compute, start):
    ready = np.sort(np.asarray(arrivals))
    t = progressive_first_token_s(ready.tolist(), compute, start)
    # reconstruct: layer i starts at max(prev end, ready_i) >= ready_i, and the pass ends after the last layer
    assert t >= ready[-1] + compute - 1e-9
    assert t >= start + compute * len(ready) - 1e-9
    assert t <= max(start, ready[-1]) + compute * len(ready) + 1e-9
