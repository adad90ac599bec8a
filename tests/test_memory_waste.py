"""GPU memory waste: its parts (core/memory_waste.py, sim/memory.py), pooled placement and elastic KV
(core/state.py), and the defragmentation policy (core/policies/defrag.py). docs/results/memory_waste.md."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from core.catalog import architecture
from core.memory_waste import InstanceTimes, waste_parts
from core.metrics import memory_waste_frac
from core.policies.autoscaling import KeepAlive
from core.policies.base import Hooks, PolicyBundle
from core.policies.defrag import DefragKeepAlive
from core.policies.placement import TierAware
from core.spec_builders import cluster_from_dict, engine_from_dict
from core.state import ClusterState
from core.workload.trace import Workload
from experiments.simulate import run
from sim.run import simulate
from tests.conftest import config

_CFG = config("cluster=small")
CLUSTER = cluster_from_dict(_CFG["cluster"])  # 2 x H100-80GB per node
ENGINE = engine_from_dict(_CFG["engine"])


# ================================================================ the parts, by hand
def test_parts_by_hand_partition_reserved_and_rebuild_the_headline():
    # one instance holding 30 B (20 B weights + 10 B KV): loading 10 s, busy 20 s (5 B of live KV), idle 70 s
    reserved, weights, kv = 30.0 * 100, 20.0 * 100, 5.0 * 20
    p = waste_parts(reserved, weights, kv, [InstanceTimes(30.0, 20.0, 10.0, 20.0, 70.0)],
                    capacity_byte_s=10_000.0, headroom_byte_s=1_000.0, stranded_byte_s=500.0,
                    unallocated_byte_s=5_500.0)
    b = p["byte_s"]
    assert b["loading"] == 300 and b["loading_kv"] == 100
    assert b["idle"] == 2100 and b["idle_kv"] == 700
    assert b["useful"] == 20 * 20 + 100 and b["kv_unused"] == 30 * 20 - 20 * 20 - 100
    assert b["useful"] + b["kv_unused"] + b["idle"] + b["loading"] == pytest.approx(reserved)
    assert b["waste_kv"] == reserved - weights - kv == 900
    assert p["frac_of_reserved"]["waste_kv"] == pytest.approx(memory_waste_frac(reserved, weights, kv))
    assert b["waste_with_idle"] == 100 + 2100 + 100
    fc = p["frac_of_capacity"]
    assert fc["reserved"] + fc["headroom"] + fc["stranded"] + fc["unallocated"] == pytest.approx(1.0)


def _legacy_reserved(instances) -> float:
    """Sum of gpu_bytes x life over the instance table (how reserved_byte_s was always counted)."""
    total = 0.0
    for _iid, rows in instances.groupby("instance"):
        total += float(rows["gpu_bytes"].iloc[0]) * float(rows["time_s"].max() - rows["time_s"].min())
    return total


def test_summary_parts_are_consistent_and_the_headline_is_unchanged():
    res = run(config("workload.max_requests=2000"), None)
    s = res.summary
    p = s["memory_waste_parts"]
    b = p["byte_s"]
    assert b["reserved"] == pytest.approx(_legacy_reserved(res.instances), rel=1e-9)
    assert s["memory_waste_frac"] == pytest.approx(1 - (b["weights"] + b["live_kv"]) / b["reserved"], rel=1e-12)
    assert s["memory_waste_frac"] == pytest.approx(p["frac_of_reserved"]["waste_kv"], rel=1e-9)
    parts = [b[k] for k in ("useful", "kv_unused", "idle", "loading")]
    assert all(0 <= x <= b["reserved"] * (1 + 1e-9) for x in parts)
    assert sum(parts) == pytest.approx(b["reserved"], rel=1e-9)
    assert b["idle_kv"] <= b["idle"] and b["loading_kv"] <= b["loading"]
    fc = p["frac_of_capacity"]
    assert fc["reserved"] + fc["headroom"] + fc["stranded"] + fc["unallocated"] == pytest.approx(1.0, abs=1e-6)


def test_the_ledger_changes_nothing_else_in_the_summary(monkeypatch):
    import sim.memory
    import sim.world

    with_ledger = run(config("workload.max_requests=1500"), None).summary

    def detached(world):
        world.memory = sim.memory.MemoryLedger(world)  # parts computed, but no hook into the cluster state

    monkeypatch.setattr(sim.world, "install_memory_ledger", detached)
    without = run(config("workload.max_requests=1500"), None).summary
    drop = {"memory_waste_parts", "wall_s", "requests_per_wall_s"}
    assert {k: v for k, v in with_ledger.items() if k not in drop} == {k: v for k, v in without.items()
                                                                      if k not in drop}


# ================================================================ pooled placement
def _fill(engine, model: str) -> tuple[int, ClusterState]:
    state = ClusterState(CLUSTER, [architecture("llama-3.1-8b", model)], engine)
    ns = state.nodes["h100-0"]
    n_added = 0
    while True:
        n, per, kv = ns.footprint(state.models[model])
        ids = ns.gpu_fit(per * n, per)
        if ids is None:
            return n_added, state
        state.add_instance(model, "h100-0", ids, per, kv, "cloud", 0.0)
        n_added += 1


def test_pooled_placement_fits_more_instances_than_per_gpu_placement():
    whole, _ = _fill(ENGINE, "m")  # 8B: 24.1 GB each, two per 72 GB GPU, 23.8 GB left on each
    pooled, state = _fill(dataclasses.replace(ENGINE, gpu_pool=True), "m")
    assert whole == 4
    assert pooled == 5  # the fifth's weights in one hole, its KV across both
    ns = state.nodes["h100-0"]
    for inst in list(state.instances.values()):
        state.remove_instance(inst)
    assert ns.gpu_free_bytes == pytest.approx([72e9, 72e9], abs=1e-3)


# ================================================================ elastic KV and defrag, simulated
def _workload(times: list[float], model: str = "m") -> Workload:
    n = len(times)
    return Workload(arrival_s=np.array(times, dtype=float), model=np.array([model] * n),
                    tenant=np.array(["t"] * n), prompt_tokens=np.full(n, 500), output_tokens=np.full(n, 50),
                    name="tiny", duration_s=max(times) + 1)


def _sim(engine, autoscaling, times: list[float]):
    bundle = PolicyBundle(TierAware(), Hooks(), autoscaling, name="t", progressive=True)
    return simulate(CLUSTER, [architecture("llama-3.2-1b", "m")], engine, bundle, _workload(times)).summary


def test_elastic_kv_takes_the_headline_below_four_percent_and_off_it_is_not():
    times = [0.0, 1.0, 2.0, 400.0, 401.0]
    static = _sim(ENGINE, KeepAlive(), times)
    elastic = _sim(dataclasses.replace(ENGINE, kv_elastic=True), KeepAlive(), times)
    assert static["completed"] == elastic["completed"] == len(times)
    assert static["memory_waste_frac"] > 0.25  # 0.5 x weights of KV reserved, almost none used
    assert elastic["memory_waste_frac"] < 0.04
    assert elastic["memory_waste_parts"]["frac_of_reserved"]["kv_unused"] < 0.04


def test_defrag_stops_idle_instances_early_and_lowers_idle_waste():
    times = [0.0, 2000.0]  # one request, a long quiet, another: keep-alive holds the instance 300 s
    off = _sim(ENGINE, KeepAlive(), times)
    on = _sim(ENGINE, DefragKeepAlive(idle_min_s=30.0), times)
    assert on["completed"] == off["completed"] == 2
    idle_off = off["memory_waste_parts"]["byte_s"]["idle"]
    idle_on = on["memory_waste_parts"]["byte_s"]["idle"]
    assert idle_on < 0.5 * idle_off
    assert on["memory_waste_parts"]["frac_of_capacity"]["waste_with_idle"] < \
        off["memory_waste_parts"]["frac_of_capacity"]["waste_with_idle"]


def test_defrag_leaves_instances_with_only_a_slow_reload_alone():
    times = [0.0, 2000.0]
    off = _sim(ENGINE, KeepAlive(), times)
    on = _sim(ENGINE, DefragKeepAlive(idle_min_s=30.0, max_reload_s=0.1), times)
    assert on["memory_waste_parts"]["byte_s"]["idle"] == pytest.approx(off["memory_waste_parts"]["byte_s"]["idle"])


def test_elastic_and_pooled_parts_still_partition_reserved_memory():
    times = [0.0, 0.5, 1.0, 1.5, 300.0, 300.2, 900.0]
    s = _sim(dataclasses.replace(ENGINE, kv_elastic=True, gpu_pool=True), KeepAlive(), times)
    b = s["memory_waste_parts"]["byte_s"]
    assert s["completed"] == len(times)
    assert b["useful"] + b["kv_unused"] + b["idle"] + b["loading"] == pytest.approx(b["reserved"], rel=1e-9)
    assert b["kv_unused"] >= 0 and b["useful"] >= b["live_kv"] > 0
    assert s["memory_waste_frac"] == pytest.approx(b["waste_kv"] / b["reserved"], rel=1e-6, abs=1e-12)


def test_elastic_kv_maps_pages_on_demand_and_gives_them_back():
    state = ClusterState(CLUSTER, [architecture("llama-3.1-8b", "m")], dataclasses.replace(ENGINE, kv_elastic=True))
    ns = state.nodes["h100-0"]
    m = state.models["m"]
    n, per, kv = ns.footprint(m)
    assert per == pytest.approx(m.resident_bytes) and kv > 0  # the weights only; KV is the cap
    inst = state.add_instance("m", "h100-0", ns.gpu_fit(per * n, per), per, kv, "cloud", 0.0)
    free0 = list(ns.gpu_free_bytes)
    pages = -(-1e9 // ENGINE.kv_page_bytes) * ENGINE.kv_page_bytes  # 1 GB of live KV, in whole pages
    assert state.kv_grow(inst, 1e9, 10.0)
    assert inst.kv_reserved_bytes == pytest.approx(pages)
    assert sum(free0) - sum(ns.gpu_free_bytes) == pytest.approx(pages)
    state.kv_shrink(inst, 20.0)  # no live KV: every page goes back
    assert ns.gpu_free_bytes == pytest.approx(free0) and inst.kv_reserved_bytes == pytest.approx(0.0)
    assert inst.reserved_byte_s(30.0) == pytest.approx(per * 30.0 + pages * 10.0)
    assert state.kv_grow(inst, 10 * kv, 30.0) and inst.kv_reserved_bytes == pytest.approx(kv)  # capped at the budget
