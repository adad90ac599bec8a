"""ServerlessLLM-style live migration, on a scenario built to need it."""

from __future__ import annotations

import numpy as np

from core.catalog import architecture
from core.policies.autoscaling import KeepAlive
from core.policies.base import PolicyBundle
from core.policies.caching import LocalityLru
from core.policies.placement import StartupTime
from core.spec_builders import cluster_from_dict
from core.specs import EngineSpec
from sim.world import World
from tests.conftest import config


def _world(migration: bool) -> World:
    cfg = config("cluster=small")["cluster"]
    cfg["node_groups"][0]["n_gpus"] = 1
    cluster = cluster_from_dict(cfg)
    a, b = architecture("llama-3.1-8b", "A"), architecture("llama-3.1-8b", "B")
    # one 8B instance per 80 GB GPU (weights + 2x KV), cheap engine start, so locality dominates
    engine = EngineSpec(kv_reserve_frac=2.0, compile_s=0.0, process_start_s=1.0, graph_capture_s=0.5)
    policy = PolicyBundle(StartupTime(migration=migration), LocalityLru(), KeepAlive(keep_alive_s=600), name="sllm")
    world = World(cluster, [a, b], engine, policy)
    # node 0's DRAM holds A and B, node 1's holds A: A's busy instance should leave node 0 for B
    for node, models in (("h100-0", ("A", "B")), ("h100-1", ("A",))):
        dram = world.state.nodes[node].tiers["dram"]
        for m in models:
            dram.reserve(m, a.weights_bytes)
            dram.commit(m, 0.0)
    return world


def _run(world: World):
    arrival = np.array([0.0, 10.0])  # A decodes 4000 tokens (~28 s): still busy when B arrives
    world.run(arrival, ["A", "B"], ["t", "t"], np.array([500, 500]), np.array([4000, 50]))
    return world


def test_migration_moves_the_busy_instance_and_serves_both():
    w = _run(_world(migration=True))
    a_req, b_req = w.requests
    assert a_req.outcome == b_req.outcome == "completed"
    reasons = [r[9] for r in w.instance_rows if r[4] == "stopped"]
    assert "migrated" in reasons  # A's first instance left node 0
    assert any(r[2] == "A" and r[3] == "h100-1" and r[4] == "loading" and r[9] == "migration"
               for r in w.instance_rows)
    # B ran on node 0, from its DRAM copy, and A's request finished on node 1
    assert b_req.node == "h100-0" and w.loads[b_req.instance.state.id].source_tier == "dram"
    assert a_req.node == "h100-1"
    # the migrated sequence paid its KV recompute: it finishes later than it would have in place
    assert a_req.finish_s > _run(_world(migration=False)).requests[0].finish_s


def test_migration_beats_a_cloud_cold_start_for_the_new_model():
    with_mig = _run(_world(migration=True)).requests[1]
    without = _run(_world(migration=False)).requests[1]
    assert without.node == "h100-1"  # no migration: B downloads from the cloud to the free node
    ttft_with = with_mig.first_token_s - with_mig.arrival_s
    ttft_without = without.first_token_s - without.arrival_s
    assert ttft_with < ttft_without


def test_loads_from_dram_release_their_read_mark():
    # B (and A) load from node 0's DRAM with no fetch hop: once their weights are in, the DRAM copies
    # must be evictable again (a read mark left behind would pin them until the node is lost)
    w = _run(_world(migration=False))
    assert any(rec.source_tier == "dram" for rec in w.loads.values())
    assert dict(w._reading) == {}


def test_progressive_first_pass_of_a_queued_batch_costs_the_sum_of_its_prefills():
    # 64 long prompts queue on one loading instance; the first pass prefills them together: its time is
    # the sum of their prefills (each attends to itself), not the prefill of one prompt 64x as long
    cfg = config("cluster=small")["cluster"]
    cluster = cluster_from_dict(cfg)
    a = architecture("llama-3.1-8b", "A")
    from core.policies.placement import TierAware

    world = World(cluster, [a], EngineSpec(), PolicyBundle(TierAware(), LocalityLru(), KeepAlive(), progressive=True))
    n, prompt = 64, 2000
    world.run(np.zeros(n), ["A"] * n, ["t"] * n, np.full(n, prompt), np.ones(n, dtype=int))
    reqs = world.requests
    assert all(r.outcome == "completed" for r in reqs)
    eng = reqs[0].instance
    batch_prefill_s = n * eng.inf.prefill_s(prompt)
    first = min(r.first_token_s for r in reqs)
    resident = world.loads[eng.state.id].weights_resident_s
    assert first <= resident + batch_prefill_s + 1.0
    assert eng.inf.prefill_s(n * prompt) > 2 * batch_prefill_s  # the wrong formula would be far slower
