"""Spot instances, preemption, node failures, store outages with failover, price-aware placement, and their cost.

Scenarios run the real simulator; scripted faults (`world.faults.schedule`) put a fault at a known time,
seeded rates (`cluster.preemption_rate_per_hour`, ...) exercise the random processes end to end.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from core.catalog import architecture
from core.cost import instance_lifetimes
from core.decisions import ColdStart
from core.errors import ConfigError
from core.policies.autoscaling import KeepAlive
from core.policies.base import PolicyBundle
from core.policies.caching import LocalityLru, NoCaching
from core.policies.placement import RoundRobin, StartupTime, TierAware
from core.spec_builders import cluster_from_dict
from core.specs import EngineSpec
from core.state import ClusterState, ClusterView
from core.units import GB, MONTH_S
from experiments.setup import build
from experiments.simulate import run
from sim.run import SimResult, collect, simulate
from sim.world import PolicyError, World
from tests.conftest import config

B8 = "llama-3.1-8b"
N0, N1 = "h100-0", "h100-1"
SMALL = config("cluster=small")["cluster"]


def _cluster_cfg(**top) -> dict:
    cfg = copy.deepcopy(SMALL)
    cfg.update(top)
    return cfg


def _world(cluster_cfg: dict, caching=None, models=(B8,), seed: int = 0, timeout_s: float = 600.0) -> World:
    cluster = cluster_from_dict(cluster_cfg)
    policy = PolicyBundle(TierAware(), caching or NoCaching(), KeepAlive(keep_alive_s=600.0), name="t")
    return World(cluster, [architecture(m) for m in models], EngineSpec(), policy, seed=seed,
                 request_timeout_s=timeout_s)


def _run(world: World, arrivals, outputs, models=None, prompt: int = 500) -> SimResult:
    n = len(arrivals)
    world.run(np.asarray(arrivals, dtype=float), list(models or [B8] * n), ["t"] * n,
              np.full(n, prompt), np.asarray(outputs))
    return collect(world, list(world.state.models.values()), world.cluster, 1.0, 10.0, "t")


def _sim(overrides: tuple[str, ...], seed: int) -> SimResult:
    """A configured run whose workload is drawn with the config's seed and whose faults with `seed`."""
    s = build(config(*overrides))
    return simulate(s.cluster, s.models, s.engine, s.policy, s.workload, seed=seed)


# ================================================================================ spot share
def test_spot_share_makes_the_first_nodes_of_each_group_spot_at_the_spot_price():
    cfg = config("cluster=medium", "cluster.spot_share=0.7")["cluster"]
    cluster = cluster_from_dict(cfg)
    g = cfg["node_groups"][0]
    # 4 x 0.7 = 2.8 -> the first 3 of the group
    assert [n.spot for n in cluster.nodes] == [True, True, True, False]
    assert cluster.nodes[0].usd_per_gpu_hour == pytest.approx(g["spot_usd_per_hour"] / g["n_gpus"])
    assert cluster.nodes[3].usd_per_gpu_hour == pytest.approx(g["od_usd_per_hour"] / g["n_gpus"])
    # per group, halves round up; a group may override the share; an explicit spot: true still makes all spot
    multi = config("cluster=multi_cloud", "cluster.spot_share=0.25")["cluster"]
    assert [n.spot for n in cluster_from_dict(multi).nodes] == [True, False, False, False]  # 2 x 0.25 = 0.5 -> 1
    multi["node_groups"][1]["spot_share"] = 1.0
    multi["node_groups"][2]["spot"] = True
    multi["spot_share"] = 0.0
    assert [n.spot for n in cluster_from_dict(multi).nodes] == [False, False, True, True]


@pytest.mark.parametrize(("change", "field"), [
    ({"spot_share": 1.5}, "cluster.spot_share"),
    ({"preemption_rate_per_hour": -1.0}, "cluster.preemption_rate_per_hour"),
    ({"failover_s": -2.0}, "cluster.failover_s"),
    ({"spot_shares": 0.5}, "spot_shares"),
    ({"stores": [{"name": "a"}, {"name": "a"}], "store": None}, "cluster.stores"),
    ({"stores": [{"name": "a"}]}, "either store"),
    ({"stores": [{"name": "a", "outage_rate_per_hour": 1.0}], "store": None}, "cluster.stores[0].outage_duration_s"),
])
def test_bad_spot_and_fault_config_names_the_field(change, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        cluster_from_dict(_cluster_cfg(**change))


def test_a_spot_node_needs_a_spot_price():
    cfg = _cluster_cfg(spot_share=1.0)
    cfg["node_groups"][0]["spot_usd_per_hour"] = 0.0
    with pytest.raises(ConfigError, match=r"node_groups\[0\].spot_usd_per_hour"):
        cluster_from_dict(cfg)


# ================================================================================ preemption
def test_a_preempted_instance_s_requests_are_requeued_and_complete_elsewhere():
    w = _world(_cluster_cfg(preemption_notice_s=0.0, replacement_delay_s=10_000.0))
    w.faults.schedule(25.0, "preemption", N0)  # the 4000-token answer is decoding on h100-0 by then
    res = _run(w, [0.0], [4000])
    req = res.requests.iloc[0]
    assert req["outcome"] == "completed" and req["node"] == N1
    assert req["ttft_s"] > 25.0  # it started over on h100-1
    s = res.summary
    assert (s["preemptions"], s["requeued"], s["requeued_by_cause"]) == (1, 1, {"preempted": 1})
    lost = res.instances[res.instances["event"] == "preempted"]
    assert list(lost["node"]) == [N0] and list(lost["time_s"]) == [25.0] and list(lost["reason"]) == ["preempted"]
    ev = res.events.set_index("kind")
    assert ev.loc["preempted", "node"] == N0 and ev.loc["preempted", "requests"] == 1
    # the lost instance is billed until the preemption only
    life = instance_lifetimes(res.instances, res.summary["sim_s"]).set_index("node")
    assert life.loc[N0, "stop_s"] == 25.0


def test_during_the_notice_running_work_finishes_and_new_work_goes_elsewhere():
    w = _world(_cluster_cfg(preemption_notice_s=120.0, replacement_delay_s=300.0))
    w.faults.schedule(25.0, "preemption", N0)
    res = _run(w, [0.0, 30.0, 200.0], [4000, 50, 50])  # the third keeps the run going past the termination
    first, second = res.requests.iloc[0], res.requests.iloc[1]
    assert first["node"] == N0 and first["outcome"] == "completed"  # done within the notice
    assert second["node"] == N1 and second["outcome"] == "completed"  # h100-0 takes nothing new
    assert res.summary["requeued"] == 0
    drained = res.instances[(res.instances["node"] == N0) & (res.instances["event"] == "stopped")]
    assert list(drained["reason"]) == ["preemption_notice"]
    assert drained["time_s"].iloc[0] == pytest.approx(first["arrival_s"] + first["e2e_s"])
    kinds = res.events[res.events["kind"] != "cloud_fetch"][["time_s", "kind"]].to_records(index=False).tolist()
    assert kinds == [(25.0, "preemption_notice"), (145.0, "preempted")]
    assert res.events.loc[res.events["kind"] == "preempted", "requests"].tolist() == [0]


def test_a_policy_placing_on_a_down_node_is_an_error():
    class Stubborn:
        def place(self, req, view):
            return ColdStart(N0, "cloud")

    cluster = cluster_from_dict(_cluster_cfg(repair_s=1000.0))
    w = World(cluster, [architecture(B8)], EngineSpec(), PolicyBundle(Stubborn(), NoCaching(), KeepAlive()))
    w.faults.schedule(0.5, "failure", N0)
    with pytest.raises(PolicyError, match=r"h100-0.*down"):
        w.run(np.array([1.0]), [B8], ["t"], np.array([10]), np.array([10]))


@pytest.mark.parametrize("placement", [TierAware(), TierAware(price_aware=True), RoundRobin(), StartupTime()])
def test_placements_skip_down_nodes(placement):
    cluster = cluster_from_dict(SMALL)
    state = ClusterState(cluster, [architecture(B8)], EngineSpec())
    view = ClusterView(state, _Clock())
    assert placement.place(_Req(B8), view) == ColdStart(N0, "cloud")
    state.nodes[N0].up = False
    assert placement.place(_Req(B8), view) == ColdStart(N1, "cloud")


PREEMPTING = ("cluster=small", "workload.max_requests=1000", "cluster.spot_share=1.0",
              "cluster.preemption_rate_per_hour=4", "cluster.replacement_delay_s=200")


def test_seeded_preemption_gives_identical_records_and_another_seed_other_ones():
    a, b, c = _sim(PREEMPTING, 0), _sim(PREEMPTING, 0), _sim(PREEMPTING, 1)
    assert a.summary["preemptions"] >= 1
    for t in ("requests", "moves", "instances", "events"):
        pd.testing.assert_frame_equal(getattr(a, t), getattr(b, t))
    notices = lambda r: r.events.loc[r.events["kind"] == "preemption_notice", ["time_s", "node"]]  # noqa: E731
    assert not notices(a).reset_index(drop=True).equals(notices(c).reset_index(drop=True))
    # the same workload either way: the fault seed draws nothing else
    pd.testing.assert_series_equal(a.requests["model"], c.requests["model"])
    # each node's preemptions come from its own stream: another policy sees them at the same times
    other = _sim((*PREEMPTING, "policy=mvp"), 0)
    end = min(a.summary["sim_s"], other.summary["sim_s"])  # the runs last as long as their requests do
    seen = [n[n["time_s"] < end].reset_index(drop=True) for n in (notices(a), notices(other))]
    assert len(seen[0]) >= 1
    pd.testing.assert_frame_equal(*seen)


def test_no_instance_starts_on_a_node_between_its_notice_and_its_replacement():
    res = _sim(PREEMPTING, 0)
    ev, inst = res.events, res.instances
    loading = inst[inst["event"] == "loading"]
    checked = 0
    for node in ("h100-0", "h100-1"):
        notes = ev[(ev["node"] == node) & (ev["kind"] == "preemption_notice")]["time_s"].tolist()
        backs = ev[(ev["node"] == node) & (ev["kind"] == "replaced")]["time_s"].tolist()
        for i, start in enumerate(notes):
            end = backs[i] if i < len(backs) else math.inf
            there = loading[(loading["node"] == node) & (loading["time_s"] >= start) & (loading["time_s"] < end)]
            assert there.empty, f"{node} got instances while down: {there}"
            checked += 1
    assert checked >= 1
    s = res.summary
    assert s["requeued"] == res.events["requests"].sum() and s["requeued"] > 0
    assert s["completed"] + s["rejected"] + s["failed"] == s["requests"]


# ======================================================================= stores and failover
def _two_stores(failover_s: float) -> dict:
    primary = {**SMALL["store"], "name": "azure_blob", "cloud": "azure", "egress_usd_per_gb": 0.087}
    backup = {**SMALL["store"], "name": "s3"}
    return _cluster_cfg(store=None, stores=[primary, backup], failover_s=failover_s)


def test_a_store_outage_fails_over_to_the_backup_after_failover_s():
    base = _run(_world(_two_stores(7.0)), [1.0], [50])
    w = _world(_two_stores(7.0))
    w.faults.schedule(0.5, "store_outage", "azure_blob", duration_s=1000.0)
    res = _run(w, [1.0], [50])
    ev = res.events.set_index("kind")
    assert ev.loc["failover", "store"] == "s3" and ev.loc["failover", "time_s"] == pytest.approx(7.5)
    assert ev.loc["failover", "duration_s"] == pytest.approx(7.0)
    assert ev.loc["cloud_fetch", "store"] == "s3" and ev.loc["cloud_fetch", "duration_s"] == pytest.approx(6.5)
    assert base.events.set_index("kind").loc["cloud_fetch", "store"] == "azure_blob"
    # the cold start waited for the failover: 6.5 s more, in its fetch phase
    r, r0 = res.requests.iloc[0], base.requests.iloc[0]
    assert r["fetch_s"] - r0["fetch_s"] == pytest.approx(6.5)
    assert r["cold_start_s"] - r0["cold_start_s"] == pytest.approx(6.5)
    # egress: the Azure primary bills the AWS node; S3 in the same cloud does not
    gb = architecture(B8).weights_bytes / GB
    assert base.summary["cost_breakdown_usd"]["egress"] == pytest.approx(gb * 0.087)
    assert res.summary["cost_breakdown_usd"]["egress"] == 0.0
    s = res.summary
    assert s["failover_recovery_s"]["count"] == 1 and s["failover_recovery_s"]["mean"] == pytest.approx(7.0)
    assert s["unavailable_s"] == pytest.approx(7.0) and s["availability"] == 1.0


def test_a_store_back_within_failover_s_serves_again_and_a_lone_store_is_waited_for():
    w = _world(_two_stores(7.0))
    w.faults.schedule(0.5, "store_outage", "azure_blob", duration_s=3.0)
    res = _run(w, [1.0], [50])
    ev = res.events.set_index("kind")
    assert "failover" not in ev.index and ev.loc["store_recovered", "time_s"] == pytest.approx(3.5)
    assert ev.loc["cloud_fetch", "store"] == "azure_blob" and ev.loc["cloud_fetch", "duration_s"] == pytest.approx(2.5)
    # one store (the default config): nothing to fail over to; cloud fetches wait for it
    w = _world(_cluster_cfg())
    w.faults.schedule(0.5, "store_outage", "s3", duration_s=50.0)
    res = _run(w, [1.0], [50])
    assert res.events.set_index("kind").loc["cloud_fetch", "duration_s"] == pytest.approx(49.5)
    assert res.summary["unavailable_s"] == pytest.approx(50.0)


# ============================================================================= availability
def test_availability_is_one_without_faults_and_requests_own_rejections_do_not_count():
    res = _run(_world(_cluster_cfg()), [0.0, 1.0, 2.0], [50, 50, 50], models=[B8, "no-such-model", B8])
    s = res.summary
    assert s["rejected"] == 1 and s["reasons"] == {"unknown_model": 1}
    assert s["availability"] == 1.0 and s["unavailable_s"] == 0.0
    assert _sim(("cluster=small", "workload.max_requests=1000"), 0).summary["availability"] == 1.0


def test_availability_drops_when_every_node_has_failed():
    w = _world(_cluster_cfg(repair_s=5000.0), timeout_s=60.0)
    w.faults.schedule(5.0, "failure", N0)
    w.faults.schedule(5.0, "failure", N1)
    res = _run(w, [0.0, 10.0, 20.0, 30.0], [4000, 50, 50, 50])
    s = res.summary
    assert s["node_failures"] == 2 and s["requeued_by_cause"] == {"node_failed": 1}
    assert s["completed"] == 0 and s["availability"] == 0.0
    assert s["unavailable_s"] == pytest.approx(s["sim_s"] - 5.0)
    assert set(res.instances.loc[res.instances["event"] == "failed", "node"]) == {N0}


def test_a_failed_node_comes_back_with_its_disks_but_not_its_host_memory():
    w = _world(_cluster_cfg(repair_s=100.0), caching=LocalityLru(pool_tier="dram", download_tier="nvme"))
    w.faults.schedule(60.0, "failure", N0)
    res = _run(w, [0.0, 200.0], [50, 50])
    lost = res.moves[res.moves["kind"] == "lost"]
    assert list(lost["from_tier"]) == ["dram"] and list(lost["time_s"]) == [60.0]
    second = res.requests.iloc[1]
    assert second["node"] == N0 and second["source_tier"] == "nvme"  # back, and loading from its own NVMe
    assert res.events.set_index("kind").loc["repaired", "time_s"] == pytest.approx(160.0)


# ====================================================================== price-aware placement
@dataclass
class _Req:
    model: str
    id: int = 0
    tenant: str = "t"
    prompt_tokens: int = 100
    output_tokens: int = 10
    arrival_s: float = 0.0


class _Clock:
    now = 0.0


def _view(cluster_cfg: dict):
    cluster = cluster_from_dict(cluster_cfg)
    state = ClusterState(cluster, [architecture(B8)], EngineSpec())
    return cluster, state, ClusterView(state, _Clock())


def test_price_aware_placement_picks_the_cheapest_gpu_hour_among_equally_fast_sources():
    cfg = config("cluster=multi_cloud")["cluster"]
    cluster, state, view = _view(cfg)
    cheapest = min(cluster.nodes, key=lambda n: (n.usd_per_gpu_hour, n.name))
    assert cheapest.cloud == "gcp"  # 87.83 $/h vs 98.32 and 117.984, 8 GPUs each
    assert TierAware(price_aware=True).place(_Req(B8), view) == ColdStart(cheapest.name, "cloud")
    assert TierAware().place(_Req(B8), view) != ColdStart(cheapest.name, "cloud")  # price is what decided
    # spot prices count: the AWS group on spot undercuts GCP on-demand
    cfg["node_groups"][0]["spot_share"] = 1.0
    cluster, state, view = _view(cfg)
    cheapest = min(cluster.nodes, key=lambda n: (n.usd_per_gpu_hour, n.name))
    assert cheapest.spot and cheapest.cloud == "aws"
    assert TierAware(price_aware=True).place(_Req(B8), view) == ColdStart(cheapest.name, "cloud")
    # a faster source beats a lower price
    dram = state.nodes["az-nd96isr-0"].tiers["dram"]
    dram.reserve(B8, architecture(B8).weights_bytes)
    dram.commit(B8, 0.0)
    assert TierAware(price_aware=True).place(_Req(B8), view) == ColdStart("az-nd96isr-0", "dram")


def test_price_aware_policy_runs_on_the_multi_cloud_preset():
    res = run(config("cluster=multi_cloud", "policy/placement=tier_aware_price", "workload.max_requests=500",
                     "output.plots=false"), None)
    first = res.instances[res.instances["event"] == "loading"].iloc[0]
    assert first["node"] == "gcp-a3-0"
    assert res.summary["completed"] == 500


# ===================================================================================== cost
def test_spot_share_lowers_gpu_cost_by_the_price_ratio_on_a_fixed_workload():
    base = ("cluster=small", "workload.max_requests=1000", "cluster.preemption_rate_per_hour=0")
    runs = {share: run(config(*base, f"cluster.spot_share={share}"), None) for share in (0.0, 0.5, 1.0)}
    for r in runs.values():  # without preemption the price changes nothing else
        pd.testing.assert_frame_equal(r.instances, runs[0.0].instances)
    g = SMALL["node_groups"][0]
    od, spot = g["od_usd_per_hour"] / g["n_gpus"], g["spot_usd_per_hour"] / g["n_gpus"]
    gpu_h = runs[0.0].summary["gpu_hours_by_node"]  # each GPU billed once, however many instances shared it
    usd = {s: r.summary["cost_breakdown_usd"]["gpu"] for s, r in runs.items()}
    assert usd[0.0] == pytest.approx(sum(gpu_h.values()) * od)
    assert usd[1.0] / usd[0.0] == pytest.approx(spot / od)
    assert usd[0.5] == pytest.approx(gpu_h[N0] * spot + gpu_h[N1] * od)  # round(2 x 0.5) = 1: the first node
    fleet = {s: r.summary["fleet_cost_usd"] for s, r in runs.items()}
    assert fleet[1.0] / fleet[0.0] == pytest.approx(spot / od)


def test_local_tier_storage_is_billed_per_gb_month_held_until_eviction_or_loss():
    cfg = _cluster_cfg(preemption_notice_s=0.0, replacement_delay_s=10_000.0)
    cfg["node_groups"][0]["tiers"]["nvme"]["price_usd_per_gb_month"] = 0.1
    w = _world(cfg, caching=LocalityLru(pool_tier="dram", download_tier="nvme"))
    w.faults.schedule(100.0, "preemption", N0)
    res = _run(w, [0.0, 200.0, 400.0], [50, 50, 50])  # the third keeps the run going until h100-1's copy lands
    m = res.moves
    landed = m[(m["to_tier"] == "nvme")].set_index("node")["end_s"]
    lost = m[(m["kind"] == "lost") & (m["from_tier"] == "nvme")]
    assert list(lost["node"]) == [N0] and list(lost["time_s"]) == [100.0]
    gb = architecture(B8).weights_bytes / GB
    end = res.summary["sim_s"]
    expected = 0.1 * gb * ((100.0 - landed[N0]) + (end - landed[N1])) / MONTH_S
    bd = res.summary["cost_breakdown_usd"]
    assert bd["storage_nvme"] == pytest.approx(expected)
    assert bd["storage_cloud"] == pytest.approx(gb * SMALL["store"]["price_usd_per_gb_month"] * end / MONTH_S)
    assert bd["storage_dram"] == 0.0 and bd["storage_sata"] == 0.0
    assert res.summary["cost_usd"] == pytest.approx(sum(bd.values()))
