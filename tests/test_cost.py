"""GPU billing: a GPU shared by several instances is paid once for the time any of them held it."""

from __future__ import annotations

import pandas as pd
import pytest

from core.cost import gpu_cost, request_cost_shares
from core.spec_builders import cluster_from_dict
from core.units import HOUR_S
from experiments.setup import build
from sim.run import simulate
from tests.conftest import config


def _lifetimes(rows: list[tuple[str, str, int, float, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"instance": i, "node": n, "model": "m", "gpus": g, "gpu_bytes": 1e9, "weights_bytes": 1e9,
                          "start_s": a, "stop_s": b} for i, n, g, a, b in rows])


def test_shared_gpu_is_billed_once_for_the_union_of_its_holders() -> None:
    cluster = cluster_from_dict(config("cluster=small")["cluster"])
    node = cluster.nodes[0]
    # a and b share GPU 0 from 0 to 2 h and 1 to 3 h; c holds GPUs 0 and 1 from 5 to 6 h
    life = _lifetimes([("a", node.name, 1, 0.0, 2 * HOUR_S), ("b", node.name, 1, 1 * HOUR_S, 3 * HOUR_S),
                       ("c", node.name, 2, 5 * HOUR_S, 6 * HOUR_S)])
    hours, usd = gpu_cost(life, cluster, {"a": (0,), "b": (0,), "c": (0, 1)})
    assert hours == pytest.approx(3 + 2)  # GPU 0: [0, 3] and [5, 6]; GPU 1: [5, 6]
    assert usd == pytest.approx(hours * node.usd_per_gpu_hour)
    whole_hours, whole_usd = gpu_cost(life, cluster)
    assert whole_hours == pytest.approx(2 + 2 + 2) and whole_usd > usd


def test_simulated_gpu_bill_never_exceeds_the_fleet_bill_and_requests_carry_it() -> None:
    s = build(config("cluster=small", "models=small", "workload.max_requests=400"))
    res = simulate(s.cluster, s.models, s.engine, s.policy, s.workload)
    gpu_usd, fleet_usd = res.summary["cost_breakdown_usd"]["gpu"], res.summary["fleet_cost_usd"]
    assert 0 < gpu_usd <= fleet_usd + 1e-9  # GPUs held by instances are a subset of the GPUs provisioned
    assert res.requests["cost_usd"].sum() <= gpu_usd + 1e-9


def test_request_shares_scale() -> None:
    cluster = cluster_from_dict(config("cluster=small")["cluster"])
    life = _lifetimes([("a", cluster.nodes[0].name, 1, 0.0, HOUR_S)])
    req = pd.DataFrame({"instance": ["a", "a"], "outcome": ["completed", "completed"], "prompt_tokens": [1, 3],
                        "output_tokens": [0, 0]})
    full = request_cost_shares(req, life, cluster)
    half = request_cost_shares(req, life, cluster, scale=0.5)
    price = cluster.nodes[0].usd_per_gpu_hour
    assert list(full) == pytest.approx([0.25 * price, 0.75 * price])
    assert list(half) == pytest.approx(list(full * 0.5))
