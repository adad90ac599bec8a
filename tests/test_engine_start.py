"""Engine start-up as phases: phase sums, the per-node compile cache, engine pools, GPU memory snapshots.

Each scenario runs the real simulator with a pinned placement (a request's tenant names its node), so
that which node starts what, and when, is known; `res.engine_starts` has one row per start.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest

from core.catalog import architecture
from core.decisions import ColdStart, Route
from core.engine_start import EngineStartOptions, options_from, snapshot_bytes
from core.errors import ConfigError
from core.policies.autoscaling import KeepAlive
from core.policies.base import PolicyBundle
from core.policies.caching import NoCaching
from core.spec_builders import cluster_from_dict, engine_from_dict
from core.specs import EngineSpec
from experiments.simulate import run
from sim.run import SimResult, collect
from sim.world import World
from tests.conftest import config

B8 = "llama-3.1-8b"
N0, N1 = "h100-0", "h100-1"
SMALL = config("cluster=small")["cluster"]
# phases by size, a compile cache, and no overlap of the start with the fetch: engine_init_s is then every phase
ENGINE = EngineSpec(process_start_s=3.0, cuda_context_s=2.0, graph_capture_s=4.0, graph_capture_per_b_s=0.5,
                    compile_s=20.0, compile_per_b_s=1.0, compile_cache=True, compile_cache_hit_s=5.0,
                    overlap_start_with_fetch=False)
PHASES = ["process_start_s", "cuda_context_s", "kv_alloc_s", "compile_s", "graph_capture_s", "restore_s"]


class Pinned:
    """Each request runs on the node its tenant names: on an instance there, else a cold start from `tier`."""

    def __init__(self, tier: str = "cloud") -> None:
        self.tier = tier

    def place(self, req, view):
        for inst in view.instances_of(req.model):
            if inst.node == req.tenant and inst.status in ("ready", "loading"):
                return Route(inst.id)
        return ColdStart(req.tenant, self.tier)


def _world(engine: EngineSpec = ENGINE, models=None, engine_start=None, **cluster_top) -> World:
    models = models or (architecture(B8),)
    cfg = copy.deepcopy(SMALL)
    cfg.update(cluster_top)
    policy = PolicyBundle(Pinned(), NoCaching(), KeepAlive(keep_alive_s=1.0), name="t", engine_start=engine_start)
    return World(cluster_from_dict(cfg), list(models), engine, policy)


def _run(world: World, arrivals, nodes, models=None) -> SimResult:
    n = len(arrivals)
    world.run(np.asarray(arrivals, dtype=float), list(models or [B8] * n), list(nodes), np.full(n, 200),
              np.full(n, 20))
    res = collect(world, list(world.state.models.values()), world.cluster, 1.0, 10.0, "t")
    assert (res.requests["outcome"] == "completed").all()
    return res


def test_phases_add_up_to_engine_init_and_match_the_request_records():
    res = _run(_world(), [0.0], [N0])
    row = res.engine_starts.iloc[0]
    m = architecture(B8)
    assert row["mode"] == "full" and row["compile_cache"] == "miss"
    assert row["process_start_s"] == 3.0 and row["cuda_context_s"] == 2.0
    assert row["compile_s"] == pytest.approx(20.0 + 1.0 * m.params_b)
    assert row["graph_capture_s"] == pytest.approx(4.0 + 0.5 * m.params_b)
    assert row["overlapped_s"] == pytest.approx(0.0, abs=1e-9)  # no overlap: every phase is on the critical path
    assert row[PHASES].sum() == pytest.approx(row["engine_init_s"])
    assert res.requests["engine_init_s"].iloc[0] == pytest.approx(row["engine_init_s"])


def test_a_start_overlapping_the_fetch_hides_process_start_and_context():
    res = _run(_world(dataclasses.replace(ENGINE, overlap_start_with_fetch=True)), [0.0], [N0])
    row = res.engine_starts.iloc[0]
    # a cloud fetch of 16 GB takes ~11 s, longer than the 5 s of process start and context
    assert row["overlapped_s"] == pytest.approx(5.0)
    assert row[PHASES].sum() - row["overlapped_s"] == pytest.approx(row["engine_init_s"])


def test_compile_cache_misses_first_then_hits_on_the_same_node_and_misses_on_another():
    res = _run(_world(), [0.0, 200.0, 400.0], [N0, N0, N1])
    rows = res.engine_starts.sort_values("time_s")
    assert list(rows["node"]) == [N0, N0, N1]
    assert list(rows["compile_cache"]) == ["miss", "hit", "miss"]
    assert rows["compile_s"].iloc[1] == 5.0
    miss, hit = rows["engine_init_s"].iloc[0], rows["engine_init_s"].iloc[1]
    assert miss - hit == pytest.approx(20.0 + architecture(B8).params_b - 5.0)


def test_compile_cache_survives_a_node_failure_but_not_a_spot_replacement():
    failed = _world(repair_s=100.0)
    failed.faults.schedule(100.0, "failure", N0)
    res = _run(failed, [0.0, 300.0], [N0, N0])
    assert list(res.engine_starts.sort_values("time_s")["compile_cache"]) == ["miss", "hit"]
    preempted = _world(preemption_notice_s=0.0, replacement_delay_s=100.0)
    preempted.faults.schedule(100.0, "preemption", N0)
    res = _run(preempted, [0.0, 300.0], [N0, N0])
    assert list(res.engine_starts.sort_values("time_s")["compile_cache"]) == ["miss", "miss"]


def test_a_pooled_engine_only_loads_weights_and_the_pool_refills():
    base = architecture(B8)
    ft = dataclasses.replace(base, name=f"{B8}/ft1", base=B8)
    w = _world(models=(base, ft), engine_start={"pool_size": 1, "pool_gpu_bytes": 1e9})
    usable = w.state.nodes[N0].spec.gpu.mem_bytes * ENGINE.gpu_mem_util
    assert w.state.nodes[N0].gpu_free_bytes[0] == pytest.approx(usable - 1e9)  # the pool's memory is held
    assert w.view.start_mode(N0, ft.name) == "pool"  # what a placement policy can read
    # two fine-tunes of one base at once: the first takes the pooled engine, the second starts in full
    res = _run(w, [0.0, 0.0, 300.0, 600.0], [N0] * 4, models=[B8, ft.name, ft.name, B8])
    rows = res.engine_starts.sort_values(["time_s", "mode"]).reset_index(drop=True)
    pooled = rows[rows["mode"] == "pool"]
    assert len(pooled) == 3 and (rows["mode"] == "full").sum() == 1
    for col in ("process_start_s", "cuda_context_s", "compile_s", "graph_capture_s"):
        assert (pooled[col] == 0.0).all()
    assert np.allclose(pooled["engine_init_s"], pooled["kv_alloc_s"])  # weights + KV only
    # each taken engine is replaced in the background, paying a full start without weights (~18 s here: a
    # compile-cache hit, the pool compiled up front); the run ends before the third refill is done
    assert w.starts.counts["pool_taken"] == 3 and w.starts.counts["pool_refilled"] == 2
    assert w.starts.pool[(N0, B8)] == 0
    full = rows[rows["mode"] == "full"].iloc[0]
    assert full["compile_cache"] == "hit" and full["engine_init_s"] > pooled["engine_init_s"].max() + 10.0


def test_snapshot_restore_time_is_its_bytes_over_the_tier_read_bandwidth():
    opts = EngineStartOptions(snapshot_tier="nvme", snapshot_extra_bytes=0.5e9)
    w = _world(engine_start=opts)
    res = _run(w, [0.0, 300.0], [N0, N0])
    rows = res.engine_starts.sort_values("time_s")
    assert list(rows["mode"]) == ["full", "snapshot"]
    m = architecture(B8)
    nbytes = snapshot_bytes(m, opts)
    nvme = w.state.nodes[N0].spec.tiers["nvme"]
    snap = rows.iloc[1]
    assert snap["restore_s"] == pytest.approx(nvme.latency_s + nbytes / nvme.read_bw_Bps)
    assert snap["engine_init_s"] == pytest.approx(0.0, abs=1e-9)
    assert w.state.nodes[N0].tiers["nvme"].reserved_bytes == pytest.approx(nbytes)  # counted against the tier
    assert w.view.start_mode(N0, B8) == "snapshot" and w.view.start_mode(N1, B8) == "full"
    ev = res.events[res.events["kind"] == "snapshot_written"]
    assert len(ev) == 1 and ev["duration_s"].iloc[0] == pytest.approx(nbytes / nvme.write_bw_Bps)


def test_bad_engine_start_options_fail_when_the_bundle_is_built():
    with pytest.raises(ConfigError, match="snapshot_tier"):
        options_from({"snapshot_tier": "tape"})
    with pytest.raises(ConfigError, match="unknown field"):
        options_from({"pool": 3})
    with pytest.raises(ConfigError, match="compile_cache_hit_s"):
        engine_from_dict({"compile_cache_hit_s": -1.0})


def test_defaults_give_the_same_records_as_the_fields_set_explicitly_to_their_defaults():
    base = ("cluster=small", "workload.max_requests=1500", "engine=tokasaurus")  # the engine without phases
    explicit = ("++engine.cuda_context_s=0.0", "++engine.compile_per_b_s=0.0", "++engine.graph_capture_per_b_s=0.0",
                "++engine.compile_cache=false", "++engine.compile_cache_hit_s=0.0",
                "++policy.engine_start.pool_size=0", "++policy.engine_start.pool_gpu_bytes=0.0",
                "++policy.engine_start.snapshot_tier=''", "++policy.engine_start.snapshot_extra_bytes=0.0")
    a = run(config(*base), None)
    b = run(config(*base, *explicit), None)
    for name in ("requests", "moves", "instances", "events", "engine_starts"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
    assert (a.engine_starts["mode"] == "full").all() and (a.engine_starts["compile_cache"] == "").all()
