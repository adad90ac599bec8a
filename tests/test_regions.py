"""Regions (core/regions.py), region-aware routing (core/policies/regions.py) and the edge scenario in the sim."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from core.errors import ConfigError
from core.policies.regions import RegionKeepAlive, RegionRouting
from core.regions import assign_client_regions, regions_from_dict, setup_from_dict
from core.spec_builders import cluster_from_dict
from core.specs import EngineSpec, ModelSpec
from core.state import ClusterState, ClusterView
from experiments.simulate import run
from sim.regions import summary as rtt_summary
from tests.conftest import config


@pytest.fixture(scope="module")
def regions_cfg() -> dict[str, Any]:
    return config("scenario=edge_regions")["regions"]


def test_table_loaded_symmetric_and_cited(regions_cfg: dict[str, Any]) -> None:
    t = regions_from_dict(regions_cfg)
    assert len(t.of_kind("edge")) >= 20 and len(t.of_kind("cloud")) >= 4
    m = t.matrix()
    assert np.allclose(m, m.T) and np.all(np.diag(m) == 0) and np.all(m[~np.eye(len(m), dtype=bool)] > 0)
    assert t.rtt_ms("us-east-1", "eu-west-1") == 68  # a measured pair is taken as given
    assert t.rtt_ms("eu-west-1", "us-east-1") == 68
    assert 1.0 <= t.inflation < 3.0  # fitted to the measured pairs
    # the model keeps geography: London is nearer Dublin than Virginia
    assert t.rtt_ms("lhr", "eu-west-1") < t.rtt_ms("lhr", "us-east-1")
    assert t.client_rtt_s("iad", "iad") == pytest.approx(t.access_ms / 1e3)


def test_table_rejects_bad_config(regions_cfg: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        regions_from_dict({**regions_cfg, "measured_rtt_ms": [["us-east-1", "nowhere", 10]]})
    with pytest.raises(ConfigError):
        regions_from_dict({**regions_cfg, "inflation": 0.5})
    with pytest.raises(ConfigError):
        regions_from_dict(regions_cfg).rtt_ms("us-east-1", "mars")
    assert setup_from_dict(None) is None


def test_client_regions_seeded() -> None:
    mix = {"a": 1.0, "b": 3.0}
    x = assign_client_regions(4000, mix, seed=1)
    assert x == assign_client_regions(4000, mix, seed=1)
    assert x != assign_client_regions(4000, mix, seed=2)
    assert 0.7 < x.count("b") / len(x) < 0.8
    by_tenant = assign_client_regions(6, mix, seed=1, tenants=["t1", "t2", "t1", "t1", "t2", "t3"])
    assert by_tenant[0] == by_tenant[2] == by_tenant[3] and by_tenant[1] == by_tenant[4]


# --------------------------------------------------------------------------- routing, on a two-region cluster
def _two_regions() -> tuple[ClusterView, Any, dict[str, Any]]:
    table = {"access_ms": 10.0, "edge_formats": [], "sites": {
        "us-east-1": {"kind": "cloud", "lat": 38.9, "lon": -77.4},
        "ap-northeast-1": {"kind": "cloud", "lat": 35.7, "lon": 139.7}},
        "measured_rtt_ms": [["us-east-1", "ap-northeast-1", 146]]}
    gpu = {"name": "H100", "mem_bytes": 80e9, "hbm_Bps": 3.35e12, "flops": 989e12, "h2d_Bps": 35e9}
    group = {"count": 1, "n_gpus": 1, "nic_Bps": 8e9, "gpu": gpu, "od_usd_per_hour": 10.0,
             "tiers": {"nvme": {"capacity_bytes": 1e12, "read_bw_Bps": 7e9, "write_bw_Bps": 7e9}}}
    cluster = cluster_from_dict({"store": {"name": "s3"}, "node_groups": [
        {**group, "name": "use", "region": "us-east-1"}, {**group, "name": "tyo", "region": "ap-northeast-1"}]})
    model = ModelSpec("m", params_b=1.0, n_layers=16, hidden_size=2048, n_kv_heads=8, head_dim=64)
    state = ClusterState(cluster, [model], EngineSpec())

    class Clock:
        now = 0.0

    return ClusterView(state, Clock()), state, table


class _Req:
    def __init__(self, client: str) -> None:
        self.id, self.model, self.tenant = 0, "m", "t"
        self.prompt_tokens, self.output_tokens, self.arrival_s = 100, 10, 0.0
        self.client_region = client


def _warm(state: ClusterState, node: str) -> str:
    ns = state.nodes[node]
    n, per_gpu, kv = ns.footprint(state.models["m"])
    inst = state.add_instance("m", node, ns.gpu_fit(per_gpu * n, per_gpu), per_gpu, kv, "nvme", 0.0)
    inst.status = "ready"
    return inst.id


def test_routing_prefers_near_region_when_warm_there_and_is_blind_when_off() -> None:
    view, state, table = _two_regions()
    use, tyo = _warm(state, "use-0"), _warm(state, "tyo-0")
    aware, blind = RegionRouting(table), RegionRouting(table, region_aware=False)
    assert aware.place(_Req("ap-northeast-1"), view).instance_id == tyo
    assert aware.place(_Req("us-east-1"), view).instance_id == use
    # switched off, the client's region plays no part: both clients get the same instance
    assert blind.place(_Req("ap-northeast-1"), view) == blind.place(_Req("us-east-1"), view)


def test_routing_goes_where_the_model_is_warm_rather_than_cold_start_near() -> None:
    view, state, table = _two_regions()
    use = _warm(state, "use-0")
    # the Tokyo client: a cold start in Tokyo costs seconds, the warm Virginia instance 156 ms
    assert RegionRouting(table).place(_Req("ap-northeast-1"), view).instance_id == use
    # ... and the replica policy starts one near the client in the background
    acts = RegionKeepAlive(table).on_arrival(_Req("ap-northeast-1"), view)
    assert [(a.node, a.model, a.reason) for a in acts] == [("tyo-0", "m", "region_replica")]
    assert not RegionKeepAlive(table, region_aware=False).on_arrival(_Req("ap-northeast-1"), view)


# --------------------------------------------------------------------------- the edge scenario, simulated
def _sim(aware: bool, seed: int = 0) -> Any:
    cfg = config("scenario=edge_regions", f"seed={seed}", f"policy.placement.region_aware={str(aware).lower()}",
                 "workload.max_requests=1500")
    return run(cfg, None), regions_from_dict(cfg["regions"])


def test_edge_scenario_sub_100ms_share_falls_when_region_blind() -> None:
    (aware, table), (blind, _) = _sim(True), _sim(False)
    a, b = rtt_summary(aware.requests, table), rtt_summary(blind.requests, table)
    assert a["share_rtt_under_100ms"] > 0.8
    assert b["share_rtt_under_100ms"] < a["share_rtt_under_100ms"] - 0.3
    req = aware.requests
    done = req[req.outcome == "completed"]
    assert (done.client_region != "").all() and done.network_s.notna().all()
    assert set(done.variant) <= {"int8", "int4", "bf16", ""}
    # the RTT is in TTFT: no completed request's TTFT is below its network round trip
    assert (done.ttft_s >= done.network_s - 1e-9).all()


def test_regions_off_leave_records_as_before() -> None:
    res = run(config("workload.max_requests=300"), None)
    assert (res.requests.client_region == "").all() and res.requests.network_s.isna().all()


def test_serve_labels_agents_with_node_regions() -> None:
    from experiments.serve_nodes import node_region_args

    assert node_region_args({}, 0) == []
    cfg = {"node_regions": ["us-east-1", "eu-west-1"]}
    assert [node_region_args(cfg, i) for i in range(3)] == [
        ["--region", "us-east-1"], ["--region", "eu-west-1"], ["--region", "us-east-1"]]
    with pytest.raises(ConfigError):
        node_region_args({"node_regions": "us-east-1"}, 0)
