"""core/policies: decisions on small hand-built cluster states (the shipped small cluster: 2 nodes x 2 H100).

Footprints on one 80 GB H100 (72 GB usable, weights x 1.5 reserved): 1B 3.72 GB, 3B 9.63 GB,
8B 24.09 GB, 14B 44.1 GB; 32B takes two GPUs at 49.2 GB each, 70B both GPUs of a node at 72 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from core.catalog import architecture
from core.decisions import ColdStart, Copy, Evict, Migration, Queue, Route, StartInstance, StopInstance
from core.loadtime import estimate_load_s
from core.policies.autoscaling import KeepAlive
from core.policies.base import (
    PolicyBundle,
    copy_with_room,
    lru_idle_stops,
    make_room,
    node_can_host,
    pick_instance,
    queue_excess,
)
from core.policies.caching import LocalityLru, NoCaching, Predictive, SeedTiered
from core.policies.forecast import HoltForecaster, WindowCounter
from core.policies.placement import RoundRobin, StartupTime, TierAware
from core.spec_builders import cluster_from_dict, engine_from_dict
from core.state import ClusterState, ClusterView
from tests.conftest import config

_CFG = config("cluster=small")
CLUSTER = cluster_from_dict(_CFG["cluster"])
ENGINE = engine_from_dict(_CFG["engine"])
N0, N1 = "h100-0", "h100-1"

A1, A3, B8, C14, D32, E70 = (
    "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-14b", "qwen2.5-32b", "llama-3.1-70b")
B8X = "llama-3.1-8b/ft-1"  # another deployment of the 8B: distinct weights
MODELS = [architecture(m) for m in (A1, A3, B8, C14, D32, E70)] + [architecture(B8, B8X)]
BYTES = {m.name: m.weights_bytes for m in MODELS}


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now


@dataclass
class Req:
    id: int
    model: str
    tenant: str = "t"
    prompt_tokens: int = 100
    output_tokens: int = 10
    arrival_s: float = 0.0


def world(now: float = 0.0):
    state = ClusterState(CLUSTER, MODELS, ENGINE)
    clock = Clock(now)
    return state, clock, ClusterView(state, clock)


def put(state: ClusterState, node: str, tier: str, model: str, now: float = 0.0, nbytes: float | None = None) -> None:
    t = state.nodes[node].tiers[tier]
    t.reserve(model, BYTES[model] if nbytes is None else nbytes)
    t.commit(model, now)


def inst(state, model, node=N0, gpus=None, status="ready", active=0, waiting=0, last_used=0.0, idle_since=0.0,
         source="cloud"):
    ns = state.nodes[node]
    n, per, kv = ns.footprint(state.models[model])
    ids = tuple(gpus) if gpus is not None else ns.gpu_fit(per * n, per)
    assert ids is not None and len(ids) == n
    i = state.add_instance(model, node, ids, per, kv, source, 0.0)
    i.status, i.active, i.waiting = status, active, waiting
    i.last_used_s, i.idle_since_s = last_used, idle_since
    return i


# =========================================================================== pick_instance
def test_pick_instance_prefers_ready_with_a_free_slot_then_least_busy():
    state, _, _ = world()
    busy = inst(state, A1, active=10)
    calm = inst(state, A1, active=2)
    loading = inst(state, A1, status="loading")
    assert pick_instance([busy, loading, calm]) is calm


def test_pick_instance_loading_beats_ready_with_a_queue():
    state, _, _ = world()
    queued = inst(state, A1, active=3, waiting=1)
    full = inst(state, A1, active=ENGINE.max_num_seqs)
    loading = inst(state, A1, status="loading", waiting=5)
    assert pick_instance([queued, full, loading]) is loading


def test_pick_instance_with_everything_saturated_takes_the_shortest_queue():
    state, _, _ = world()
    q4 = inst(state, A1, active=1, waiting=4)
    q2 = inst(state, A1, active=1, waiting=2)
    over = inst(state, A1, status="loading", waiting=ENGINE.max_num_seqs + 3)  # 3 beyond what it will batch
    assert pick_instance([q4, q2, over]) is q2
    stopping = inst(state, A1, status="stopping")
    assert pick_instance([stopping]) is None
    assert pick_instance([]) is None


def test_queue_excess_counts_loading_instances_as_coming_capacity():
    state, _, _ = world()
    r = inst(state, A1, waiting=5)
    lo = inst(state, A1, status="loading", waiting=ENGINE.max_num_seqs + 2)
    gone = inst(state, A1, status="stopping", waiting=50)
    assert queue_excess([r, lo, gone]) == (7, 2)


# =========================================================================== RoundRobin
def test_round_robin_cycles_nodes_and_always_downloads_from_the_cloud():
    state, _, view = world()
    put(state, N0, "dram", A1)
    put(state, N1, "nvme", B8)
    rr = RoundRobin()
    got = [rr.place(Req(i, m), view) for i, m in enumerate([A1, B8, A3, C14])]
    assert got == [ColdStart(N0, "cloud"), ColdStart(N1, "cloud"), ColdStart(N0, "cloud"), ColdStart(N1, "cloud")]


def test_round_robin_with_local_source_uses_the_fastest_local_tier():
    state, _, view = world()
    put(state, N0, "dram", A1)
    assert RoundRobin(source="local").place(Req(0, A1), view) == ColdStart(N0, "dram")


def test_round_robin_skips_a_full_node_then_evicts_then_queues():
    state, _, view = world()
    inst(state, E70, N0, active=1)  # N0 full and busy
    rr = RoundRobin()
    assert [rr.place(Req(i, A1), view) for i in range(2)] == [ColdStart(N1, "cloud")] * 2
    idle = inst(state, E70, N1)  # N1 full but idle: hosting needs an eviction
    assert rr.place(Req(3, A1), view) == ColdStart(N1, "cloud")
    idle.active = 1
    assert rr.cold_start(Req(4, A1), view) is None
    assert rr.place(Req(4, A1), view) == Queue("no_gpu_capacity")


def test_placement_routes_warm_and_scales_up_past_the_queue_threshold():
    state, _, view = world()
    i = inst(state, A1, N0, active=3)
    rr = RoundRobin()
    rr.bind(KeepAlive(scale_up_queue=4))
    assert rr.place(Req(0, A1), view) == Route(i.id)  # free slot
    i.waiting = 4  # 4 per instance: not above the threshold
    assert rr.place(Req(1, A1), view) == Route(i.id)
    i.waiting = 5
    assert rr.place(Req(2, A1), view) == ColdStart(N0, "cloud")
    unbound = RoundRobin()
    assert unbound.place(Req(3, A1), view) == Route(i.id)  # no autoscaler: never scales up on a queue
    unbound.bind(object())
    assert unbound.autoscaler is None


def test_policy_bundle_binds_the_autoscaler_and_takes_the_shortest_tick():
    rr = RoundRobin()
    ka = KeepAlive(tick_s=5.0)
    b = PolicyBundle(rr, SeedTiered(tick_s=30.0), ka)
    assert rr.autoscaler is ka and b.tick_s == 5.0


# =========================================================================== TierAware
def test_tier_aware_picks_the_node_with_the_fastest_tier():
    state, _, view = world()
    put(state, N0, "sata", B8)
    put(state, N1, "nvme", B8)
    assert TierAware().place(Req(0, B8), view) == ColdStart(N1, "nvme")
    put(state, N0, "dram", B8)
    assert TierAware().place(Req(0, B8), view) == ColdStart(N0, "dram")


def test_tier_aware_without_a_local_copy_packs_the_fullest_node_that_fits():
    # best fit across nodes keeps whole nodes free for large tensor-parallel models
    state, _, view = world()
    inst(state, A1, N1, active=1)
    assert TierAware().place(Req(0, B8), view) == ColdStart(N1, "cloud")
    assert StartupTime().place(Req(0, B8), view) == ColdStart(N1, "cloud")


def test_tier_aware_evicts_rather_than_give_up_a_faster_tier():
    state, _, view = world()
    put(state, N0, "dram", B8)
    idle = inst(state, E70, N0)  # idle: can be stopped
    assert TierAware().place(Req(0, B8), view) == ColdStart(N0, "dram")
    idle.active = 1  # busy: N0 cannot host
    assert TierAware().place(Req(0, B8), view) == ColdStart(N1, "cloud")


def test_tier_aware_prefers_sata_even_where_the_cloud_is_faster():
    # the seed's rule ranks tiers, not times: on the small cluster SATA (0.56 GB/s) is slower than S3 (1.488 GB/s)
    state, _, view = world()
    put(state, N0, "sata", B8)
    assert TierAware().place(Req(0, B8), view) == ColdStart(N0, "sata")
    n, _, kv = state.nodes[N0].footprint(state.models[B8])
    node, store = CLUSTER.nodes[0], CLUSTER.store
    m = state.models[B8]
    assert estimate_load_s("cloud", m, node, store, ENGINE, n, kv) < estimate_load_s("sata", m, node, store,
                                                                                     ENGINE, n, kv)


# =========================================================================== StartupTime
def test_startup_time_picks_the_node_with_the_fastest_estimated_load():
    state, _, view = world()
    put(state, N1, "nvme", B8)
    assert StartupTime().place(Req(0, B8), view) == ColdStart(N1, "nvme")


def test_startup_time_prefers_a_cloud_download_to_a_slower_sata_copy():
    state, _, view = world()
    put(state, N0, "sata", B8)
    # S3 with 16 streams (1.488 GB/s) beats SATA (0.56 GB/s) on either node
    assert StartupTime().place(Req(0, B8), view).source_tier == "cloud"


def test_startup_time_ties_go_to_the_node_that_needs_no_eviction():
    state, _, view = world()
    # N0: four idle 8B instances leave 23.82 GB on each GPU (47.6 GB free in all) -- one 8B needs 24.09 GB
    for g in (0, 0, 1, 1):
        inst(state, B8, N0, gpus=(g,))
    # N1: busy instances leave 27.9 GB on GPU 0 and 3.8 GB on GPU 1 (31.7 GB in all): fits without eviction
    inst(state, C14, N1, gpus=(0,), active=1)
    inst(state, C14, N1, gpus=(1,), active=1)
    inst(state, B8, N1, gpus=(1,), active=1)
    assert state.nodes[N0].gpu_free_total > state.nodes[N1].gpu_free_total
    assert StartupTime().place(Req(0, B8X), view) == ColdStart(N1, "cloud")


def test_startup_time_charges_the_reload_of_the_idle_instances_it_would_stop():
    state, clock, view = world()
    put(state, N0, "dram", B8)
    idle = inst(state, E70, N0, last_used=0.0)  # N0 has the faster copy but room only if this idle 70B stops
    # used a moment ago, so likely to be asked again: the DRAM copy saves the 8B's download, but reloading the
    # 70B from the cloud would cost far more, so the free node wins
    assert StartupTime().place(Req(0, B8), view) == ColdStart(N1, "cloud")
    clock.now = 1800.0  # idle for 30 min (30 reuse horizons): its burst is over, stopping it is cheap
    assert StartupTime().place(Req(0, B8), view) == ColdStart(N0, "dram")
    assert StartupTime(reuse_horizon_s=3600.0).place(Req(0, B8), view) == ColdStart(N1, "cloud")
    clock.now = 0.0
    inst(state, E70, N1, active=1)  # now N1 is full of busy instances: stopping the idle one is the only way
    assert StartupTime().place(Req(0, B8), view) == ColdStart(N0, "dram")
    idle.active = 1
    assert StartupTime().place(Req(0, B8), view) == Queue("no_gpu_capacity")


def test_startup_time_stops_a_cheap_to_reload_idle_instance_for_a_much_faster_local_copy():
    state, _, view = world()
    put(state, N0, "dram", E70)  # a 70B copy in DRAM on N0, where an idle 1B (cheap to reload) holds the room
    put(state, N0, "dram", A1)
    n0 = state.nodes[N0]
    small = inst(state, A1, N0, last_used=0.0)  # used just now, but a 1B reloads from DRAM in seconds
    assert small.idle and not node_can_host(n0, E70, view, allow_evict=False)
    assert node_can_host(n0, E70, view, allow_evict=True)
    assert StartupTime().place(Req(0, E70), view) == ColdStart(N0, "dram")


def test_startup_time_counts_the_loading_queue_on_a_node():
    state, _, view = world()
    assert StartupTime().place(Req(0, B8), view) == ColdStart(N0, "cloud")  # a tie: the first name
    state.nodes[N0].loads_in_flight["nic"] = 100 * CLUSTER.nodes[0].nic_Bps  # 100 s of downloads queued
    assert StartupTime().place(Req(0, B8), view) == ColdStart(N1, "cloud")


def test_startup_time_skips_down_nodes():
    state, _, view = world()
    put(state, N0, "dram", B8)
    state.nodes[N0].up = False
    assert StartupTime().place(Req(0, B8), view) == ColdStart(N1, "cloud")


def test_startup_time_minimises_over_sources_on_a_node():
    state, _, view = world()
    put(state, N0, "sata", B8)
    put(state, N1, "sata", B8)
    d = StartupTime().place(Req(0, B8), view)
    assert isinstance(d, ColdStart) and d.source_tier == "cloud"


def test_startup_time_migrates_the_cheapest_busy_instance_when_every_node_is_full():
    state, _, view = world()
    # a 32B needs 49.2 GB on both GPUs of one node; neither node has that
    inst(state, A1, N0, gpus=(0,), active=1)
    v0 = inst(state, C14, N0, gpus=(1,), active=1)
    inst(state, A3, N1, gpus=(0,), active=1)
    v1 = inst(state, C14, N1, gpus=(1,), active=1)
    v0.kv_used_bytes = 10_000 * state.models[C14].kv_bytes_per_token  # 10k tokens to recompute: 0.2 s more
    assert StartupTime().place(Req(0, D32), view) == Queue("no_gpu_capacity")
    d = StartupTime(migration=True).place(Req(0, D32), view)
    assert d == ColdStart(N1, "cloud", migrate=Migration(v1.id, N0, "cloud", 2e-5, 0.5))


# =========================================================================== KeepAlive: scaling up
def test_wants_new_instance_with_none_running():
    _, _, view = world()
    assert KeepAlive().wants_new_instance(A1, view)


def test_wants_new_instance_counts_loading_instances_as_coming_capacity():
    state, _, view = world()
    inst(state, A1, waiting=5)
    inst(state, A1, status="loading")
    # 5 waiting over 2 live instances = 2.5 <= 4: no new instance
    assert not KeepAlive(scale_up_queue=4).wants_new_instance(A1, view)
    # ignoring the loading one: 5 over 1 ready = 5 > 4, the over-scaling of simulators that ignore loads
    assert KeepAlive(scale_up_queue=4, count_loading=False).wants_new_instance(A1, view)


def test_wants_new_instance_with_only_a_loading_instance():
    state, _, view = world()
    inst(state, A1, status="loading", waiting=10)
    assert not KeepAlive().wants_new_instance(A1, view)  # it will batch all 10
    assert KeepAlive(count_loading=False).wants_new_instance(A1, view)


def test_wants_new_instance_threshold_is_strict():
    state, _, view = world()
    inst(state, A1, waiting=8)
    inst(state, A1, waiting=0)
    assert not KeepAlive(scale_up_queue=4).wants_new_instance(A1, view)
    assert KeepAlive(scale_up_queue=3.9).wants_new_instance(A1, view)


@pytest.mark.parametrize(
    "kwargs", [{"keep_alive_s": -1}, {"scale_up_queue": -1}, {"tick_s": 0}, {"min_instances": -1}]
)
def test_keep_alive_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        KeepAlive(**kwargs)


# =========================================================================== KeepAlive: scaling down
def test_on_tick_stops_instances_idle_longer_than_keep_alive():
    state, clock, view = world(now=400.0)
    old = inst(state, A1, idle_since=0.0)
    edge = inst(state, A3, idle_since=100.0)  # exactly 300 s idle
    recent = inst(state, B8, idle_since=200.0)
    busy = inst(state, C14, N1, active=1, idle_since=0.0)
    loading = inst(state, A1, N1, status="loading", idle_since=0.0)
    acts = KeepAlive(keep_alive_s=300.0).on_tick(view)
    assert acts == [StopInstance(old.id, reason="keep_alive"), StopInstance(edge.id, reason="keep_alive")]
    assert {recent.id, busy.id, loading.id}.isdisjoint(a.instance_id for a in acts)
    clock.now = 299.0
    assert KeepAlive(keep_alive_s=300.0).on_tick(view) == ()


def test_on_tick_respects_min_instances():
    state, _, view = world(now=1000.0)
    first = inst(state, A1, idle_since=10.0)
    inst(state, A1, idle_since=20.0)
    ka = KeepAlive(keep_alive_s=300.0, min_instances=1)
    assert ka.on_tick(view) == [StopInstance(first.id, reason="keep_alive")]  # longest idle goes, one stays
    lone = inst(state, B8, idle_since=0.0)
    assert lone.id not in [a.instance_id for a in ka.on_tick(view)]
    inst(state, B8, N1, status="loading")  # a loading instance counts towards the minimum
    assert StopInstance(lone.id, reason="keep_alive") in ka.on_tick(view)


def test_on_idle_stops_at_once_only_with_zero_keep_alive():
    state, _, view = world()
    i = inst(state, A1)
    assert KeepAlive(keep_alive_s=0.0).on_idle(i, view) == [StopInstance(i.id, reason="keep_alive")]
    assert KeepAlive(keep_alive_s=1.0).on_idle(i, view) == ()


# =========================================================================== lru_idle_stops
def _crowded_n0(state):
    """N0: GPU 0 holds 14B `a` (used 5 s) + 8B `b` (30 s); GPU 1 holds 14B `c` (10 s) + 8B `d` (40 s); all idle."""
    a = inst(state, C14, N0, gpus=(0,), last_used=5.0)
    b = inst(state, B8, N0, gpus=(0,), last_used=30.0)
    c = inst(state, C14, N0, gpus=(1,), last_used=10.0)
    d = inst(state, B8, N0, gpus=(1,), last_used=40.0)
    return a, b, c, d


def test_lru_idle_stops_stops_least_recently_used_only_until_the_model_fits():
    state, _, view = world()
    a, _, _, _ = _crowded_n0(state)
    assert lru_idle_stops(N0, B8X, view) == [StopInstance(a.id, reason="gpu_pressure")]


def test_lru_idle_stops_skips_busy_and_loading_instances():
    state, _, view = world()
    a, _, c, _ = _crowded_n0(state)
    a.active = 1
    assert lru_idle_stops(N0, B8X, view) == [StopInstance(c.id, reason="gpu_pressure")]
    a.active, a.status = 0, "loading"
    assert lru_idle_stops(N0, B8X, view) == [StopInstance(c.id, reason="gpu_pressure")]


def test_lru_idle_stops_returns_nothing_when_the_model_already_fits():
    state, _, view = world()
    inst(state, C14, N0, gpus=(0,))
    assert lru_idle_stops(N0, B8, view) == []


def test_lru_idle_stops_multi_gpu_stops_on_the_gpus_that_matter():
    # a 32B needs 49.2 GB on each of two GPUs
    state, _, view = world()
    x = inst(state, C14, N0, gpus=(0,), last_used=1.0)
    y = inst(state, C14, N0, gpus=(1,), last_used=2.0)
    inst(state, A1, N0, gpus=(1,), last_used=5.0)  # stays: GPU 1 has 68.3 GB once y is gone
    assert lru_idle_stops(N0, D32, view) == [StopInstance(x.id, reason="gpu_pressure"),
                                             StopInstance(y.id, reason="gpu_pressure")]


def test_lru_idle_stops_returns_nothing_when_impossible_even_with_enough_bytes_in_all():
    state, _, view = world()
    inst(state, A1, N0, gpus=(0,), last_used=1.0)
    inst(state, C14, N0, gpus=(0,), active=1)  # busy: GPU 0 can reach 27.9 GB free at most
    inst(state, C14, N0, gpus=(1,), last_used=2.0)
    # stopping both idle ones frees 27.9 + 72 = 99.9 GB >= 98.4 GB, but not 49.2 GB on each GPU
    assert lru_idle_stops(N0, D32, view) == []


def test_lru_idle_stops_frees_every_gpu_of_a_multi_gpu_victim():
    state, _, view = world()
    v = inst(state, D32, N0, last_used=1.0)
    assert lru_idle_stops(N0, E70, view) == [StopInstance(v.id, reason="gpu_pressure")]


def test_lru_idle_stops_demotes_only_models_not_already_in_the_tier():
    state, _, view = world()
    x = inst(state, C14, N0, gpus=(0,), last_used=1.0)
    y = inst(state, B8, N0, gpus=(1,), last_used=2.0)
    z = inst(state, C14, N0, gpus=(1,), last_used=3.0)
    put(state, N0, "nvme", C14)
    assert lru_idle_stops(N0, D32, view, demote_to="nvme") == [
        StopInstance(x.id, reason="gpu_pressure", demote_to=None),
        StopInstance(y.id, reason="gpu_pressure", demote_to="nvme"),
        StopInstance(z.id, reason="gpu_pressure", demote_to=None),
    ]
    assert [s.demote_to for s in lru_idle_stops(N0, D32, view, demote_to="tape")] == [None] * 3


def test_caching_policies_relieve_gpu_pressure_with_lru_stops():
    state, _, view = world()
    a, _, _, _ = _crowded_n0(state)
    assert NoCaching().on_gpu_pressure(N0, B8X, view) == [StopInstance(a.id, reason="gpu_pressure")]
    assert LocalityLru().on_gpu_pressure(N0, B8X, view) == [StopInstance(a.id, reason="gpu_pressure")]
    assert SeedTiered().on_gpu_pressure(N0, B8X, view) == [
        StopInstance(a.id, reason="gpu_pressure", demote_to="nvme")]


# =========================================================================== make_room / copy_with_room
def _full_dram(state):
    """N0 DRAM (256 GB): 70B (141.2 GB, used at 1 s), 32B (65.6 GB, 2 s), 14B (29.4 GB, 3 s): 19.8 GB free."""
    for t, m in enumerate((E70, D32, C14), start=1):
        put(state, N0, "dram", m, now=float(t))
    return state.nodes[N0]


def test_make_room_evicts_least_recently_used_first():
    state, _, _ = world()
    ns = _full_dram(state)
    assert make_room(ns, "dram", 16e9) == []
    assert make_room(ns, "dram", 65.6e9) == [Evict(E70, N0, "dram")]
    assert make_room(ns, "dram", 250e9) == [Evict(E70, N0, "dram"), Evict(D32, N0, "dram"), Evict(C14, N0, "dram")]
    ns.tiers["dram"].touch(E70, 10.0)
    assert make_room(ns, "dram", 65.6e9) == [Evict(D32, N0, "dram")]


def test_make_room_never_evicts_the_protected_model():
    state, _, _ = world()
    ns = _full_dram(state)
    assert make_room(ns, "dram", 65.6e9, protect=frozenset({E70})) == [Evict(D32, N0, "dram")]
    assert make_room(ns, "dram", 250e9, protect=frozenset({C14})) is None


def test_make_room_impossible_cases():
    state, _, _ = world()
    ns = _full_dram(state)
    assert make_room(ns, "dram", 257e9) is None  # more than the tier
    assert make_room(ns, "tape", 1.0) is None  # no such tier
    ns.tiers["dram"].reserve(B8, BYTES[B8])  # an incoming write cannot be evicted
    assert make_room(ns, "dram", 256e9 - BYTES[B8] + 1e6) is None
    assert len(make_room(ns, "dram", 256e9 - BYTES[B8])) == 3


def test_copy_with_room():
    state, _, _ = world()
    ns = _full_dram(state)
    assert copy_with_room(ns, B8, BYTES[B8], "dram", "cache") == [Copy(B8, N0, "dram", kind="cache")]
    assert copy_with_room(ns, E70, BYTES[E70], "dram", "cache") == []  # already there
    assert copy_with_room(ns, A3, 100e9, "dram", "prefetch") == [Evict(E70, N0, "dram"),
                                                                 Copy(A3, N0, "dram", kind="prefetch")]
    ns.tiers["nvme"].reserve(A1, BYTES[A1])
    assert copy_with_room(ns, A1, BYTES[A1], "nvme", "cache") == []  # already incoming
    assert copy_with_room(ns, A1, 300e9, "dram", "cache") == []  # cannot fit


# =========================================================================== SeedTiered
def test_seed_tiered_writes_cloud_downloads_to_sata():
    state, _, view = world()
    cloud = inst(state, B8, N1, source="cloud")
    assert SeedTiered().on_load_done(cloud, view) == [Copy(B8, N1, "sata", kind="cache")]
    local = inst(state, A1, N1, source="nvme")
    assert SeedTiered().on_load_done(local, view) == ()


def _seed_with_arrivals(model: str, times: list[float], **kw) -> SeedTiered:
    p = SeedTiered(**kw)
    for i, t in enumerate(times):
        p.on_arrival(Req(i, model, arrival_s=t), None)  # type: ignore[arg-type]
    return p


def test_seed_tiered_promotes_sata_to_nvme_for_a_used_model_when_nvme_has_room():
    state, _, view = world(now=130.0)
    put(state, N0, "sata", B8)
    p = _seed_with_arrivals(B8, [100.0])
    assert p.on_tick(view) == [Copy(B8, N0, "nvme", kind="promote")]


def test_seed_tiered_does_not_evict_from_nvme_to_promote():
    state, _, view = world(now=130.0)
    put(state, N0, "sata", B8)
    put(state, N0, "nvme", E70, nbytes=990e9)  # 10 GB left, the 8B needs 16 GB
    assert _seed_with_arrivals(B8, [100.0]).on_tick(view) == ()


def test_seed_tiered_does_not_promote_an_unused_model():
    state, _, view = world(now=4000.0)
    put(state, N0, "sata", B8)
    assert _seed_with_arrivals(B8, [0.0]).on_tick(view) == ()  # last request more than an hour ago
    assert SeedTiered().on_tick(view) == ()  # never requested


def test_seed_tiered_skips_models_already_on_nvme():
    state, _, view = world(now=130.0)
    put(state, N0, "sata", B8)
    put(state, N0, "nvme", B8)
    state.nodes[N1].tiers["nvme"].reserve(B8, BYTES[B8])
    put(state, N1, "sata", B8)
    assert _seed_with_arrivals(B8, [100.0], promote_rate_per_hour=100).on_tick(view) == ()


def test_seed_tiered_starts_an_instance_for_a_hot_model_on_nvme():
    state, _, view = world(now=130.0)
    put(state, N1, "nvme", B8)
    hot = _seed_with_arrivals(B8, [100.0 + i for i in range(6)])  # 6 in the last hour > 5 per hour
    assert hot.on_tick(view) == [StartInstance(B8, N1, "nvme", reason="promote")]
    lukewarm = _seed_with_arrivals(B8, [100.0 + i for i in range(5)])
    assert lukewarm.on_tick(view) == ()
    i = inst(state, B8, N0, status="loading")
    assert hot.on_tick(view) == ()  # already has a live instance
    state.remove_instance(i)
    inst(state, E70, N1, active=1)  # N1's GPUs are taken
    assert hot.on_tick(view) == ()


# =========================================================================== LocalityLru
def test_locality_lru_keeps_loaded_models_in_dram_and_downloads_on_nvme():
    state, _, view = world()
    p = LocalityLru()
    assert p.on_load_done(inst(state, B8, N0, source="cloud"), view) == [
        Copy(B8, N0, "nvme", kind="cache"), Copy(B8, N0, "dram", kind="cache")]
    assert p.on_load_done(inst(state, A1, N0, source="sata"), view) == [Copy(A1, N0, "dram", kind="cache")]
    put(state, N1, "dram", A3)
    assert p.on_load_done(inst(state, A3, N1, source="dram"), view) == ()
    no_ssd = LocalityLru(download_tier=None)
    assert no_ssd.on_load_done(inst(state, C14, N1, source="cloud"), view) == [Copy(C14, N1, "dram", kind="cache")]


def test_locality_lru_makes_room_in_dram_by_lru():
    state, _, view = world()
    put(state, N0, "dram", E70, now=1.0)
    put(state, N0, "dram", D32, now=2.0)
    put(state, N0, "dram", C14, now=3.0)
    i = inst(state, B8X, N0, source="nvme")
    got = LocalityLru().on_load_done(i, view)
    # 19.8 GB free, 16.06 GB needed: fits without eviction
    assert got == [Copy(B8X, N0, "dram", kind="cache")]
    put(state, N0, "dram", A3, now=4.0)  # 13.4 GB free now
    assert LocalityLru().on_load_done(i, view) == [Evict(E70, N0, "dram"), Copy(B8X, N0, "dram", kind="cache")]


# =========================================================================== Predictive
def _predictive(arrivals: dict[str, int], **kw) -> Predictive:
    p = Predictive(**kw)
    k = 0
    for model, n in arrivals.items():
        for j in range(n):
            p.on_arrival(Req(k, model, arrival_s=j * 59.0 / max(n, 1)), None)  # type: ignore[arg-type]
            k += 1
    return p


def test_predictive_burst_prefetches_to_dram_and_prewarms():
    _, _, view = world(now=60.0)
    p = _predictive({B8: 30})  # 0.5 req/s in the first minute
    assert p.on_tick(view) == [Copy(B8, N0, "dram", kind="prefetch"), StartInstance(B8, N0, "cloud", "prewarm")]


def test_predictive_targets_the_node_holding_the_model_closest_to_the_gpu():
    state, _, view = world(now=60.0)
    put(state, N1, "nvme", B8)
    assert _predictive({B8: 30}).on_tick(view) == [
        Copy(B8, N1, "dram", kind="prefetch"), StartInstance(B8, N1, "nvme", "prewarm")]
    put(state, N1, "dram", B8)
    assert _predictive({B8: 30}).on_tick(view) == [StartInstance(B8, N1, "dram", "prewarm")]


def test_predictive_low_rate_prefetches_without_prewarming():
    _, _, view = world(now=60.0)
    assert _predictive({B8: 1}).on_tick(view) == [Copy(B8, N0, "dram", kind="prefetch")]  # 1/60 req/s
    assert _predictive({}).on_tick(view) == ()


def test_predictive_does_not_prewarm_beyond_forecast_load():
    state, _, view = world(now=60.0)
    inst(state, B8, N0, status="loading")
    acts = _predictive({B8: 30}, service_s=2.0).on_tick(view)  # 0.5 req/s x 2 s = 1 instance, and one is coming
    assert not any(isinstance(a, StartInstance) for a in acts)
    assert acts == [Copy(B8, N1, "dram", kind="prefetch")]  # N1 has the most free GPU memory


def test_predictive_caps_prewarms_per_tick_hottest_first():
    _, _, view = world(now=60.0)
    acts = _predictive({A1: 30, B8: 40}, max_prewarm_per_tick=1).on_tick(view)
    starts = [a for a in acts if isinstance(a, StartInstance)]
    assert starts == [StartInstance(B8, N0, "cloud", "prewarm")]
    assert {a.model for a in acts if isinstance(a, Copy)} == {A1, B8}


def test_predictive_without_gpu_room_only_prefetches():
    state, _, view = world(now=60.0)
    inst(state, E70, N0, active=1)
    inst(state, E70, N1, active=1)
    acts = _predictive({B8: 30}).on_tick(view)
    assert acts == [Copy(B8, N0, "dram", kind="prefetch")]


# =========================================================================== forecasters
def test_window_counter_by_hand():
    w = WindowCounter(bucket_s=300.0, horizon_s=3600.0)  # 12 buckets
    for t in (0.0, 299.0, 300.0, 3599.0, 3600.0):
        w.observe("m", t)
    assert w.count("m", 3599.0) == 4  # buckets 0..11; the arrival at 3600 is in bucket 12, not yet
    assert w.count("m", 3600.0) == 3  # bucket 0 (two arrivals) fell out of the hour
    assert w.rate_per_hour("m", 3600.0) == 3.0
    assert w.count("m", 3600.0 + 3600.0) == 0
    assert w.count("other", 0.0) == 0
    assert w.models() == ["m"]


def test_window_counter_rate_over_a_horizon_rounded_up_to_buckets():
    w = WindowCounter(bucket_s=300.0, horizon_s=1000.0)  # ceil(1000 / 300) = 4 buckets = 1200 s
    for t in range(0, 1200, 100):
        w.observe("m", float(t))
    assert w.count("m", 1199.0) == 12
    assert w.rate_per_hour("m", 1199.0) == pytest.approx(12 * 3600 / 1200)


@pytest.mark.parametrize(("bucket", "horizon"), [(0.0, 10.0), (10.0, 5.0)])
def test_window_counter_rejects_bad_windows(bucket, horizon):
    with pytest.raises(ValueError):
        WindowCounter(bucket_s=bucket, horizon_s=horizon)


def test_holt_forecaster_by_hand():
    f = HoltForecaster(window_s=60.0, alpha=0.5, beta=0.3)
    for _ in range(6):
        f.observe("m", 10.0)  # window 0: 0.1 req/s
    assert f.forecast("m") == 0.0 and f.models() == []  # nothing closed yet
    for _ in range(12):
        f.observe("m", 70.0)  # window 1: 0.2 req/s; closing window 0 sets level 0.1, trend 0
    assert f.forecast("m") == pytest.approx(0.1)
    assert f.forecast("m", 600.0) == pytest.approx(0.1)
    f.advance(120.0)  # level 0.5*0.2 + 0.5*(0.1+0) = 0.15; trend 0.3*0.05 + 0.7*0 = 0.015
    assert f.forecast("m") == pytest.approx(0.15)
    assert f.forecast("m", 120.0) == pytest.approx(0.15 + 2 * 0.015)
    f.advance(180.0)  # empty window: level 0.5*0 + 0.5*0.165 = 0.0825; trend 0.3*(-0.0675) + 0.7*0.015 = -0.00975
    assert f.forecast("m") == pytest.approx(0.0825)
    assert f.forecast("m", 60.0) == pytest.approx(0.0825 - 0.00975)
    assert f.forecast("m", 600.0) == 0.0  # clamped at zero
    assert f.forecast("never") == 0.0


def test_holt_with_zero_beta_is_an_ewma():
    f = HoltForecaster(window_s=10.0, alpha=0.25, beta=0.0)
    counts = [10, 0, 20, 5]
    for w, n in enumerate(counts):
        for _ in range(n):
            f.observe("m", w * 10.0 + 1.0)
    f.advance(40.0)
    level = 1.0
    for n in counts[1:]:
        level = 0.25 * n / 10.0 + 0.75 * level
    assert f.forecast("m") == pytest.approx(level)
    assert f.forecast("m", 1e6) == pytest.approx(level)  # no trend


def test_holt_first_window_of_a_late_model_sets_its_level():
    f = HoltForecaster(window_s=60.0, alpha=0.5, beta=0.3)
    f.observe("a", 0.0)
    for _ in range(30):
        f.observe("b", 130.0)  # windows 0 and 1 close before b is seen
    f.advance(180.0)
    assert f.forecast("b") == pytest.approx(0.5)
    assert f.models() == ["a", "b"]


@pytest.mark.parametrize("kw", [{"window_s": 0}, {"alpha": 0}, {"alpha": 1.5}, {"beta": -0.1}])
def test_holt_rejects_bad_parameters(kw):
    with pytest.raises(ValueError):
        HoltForecaster(**kw)


def test_startup_time_ties_prefer_a_local_copy_to_a_download_elsewhere():
    """Engine start hides a 1B model's fetch, so a DRAM copy on N0 and a download on N1 estimate the same start-up
    time; the local copy must win (before: best fit sent it to the fuller N1, from the cloud, ignoring the copy)."""
    state, _, view = world()
    put(state, N0, "dram", A1)
    inst(state, A3, N1, gpus=(0,), active=1)  # N1 is the fuller node that fits
    est = StartupTime()
    assert est._estimate(state.nodes[N0], A1, view)[0] == pytest.approx(est._estimate(state.nodes[N1], A1, view)[0],
                                                                       abs=1e-3)
    assert est.place(Req(0, A1), view) == ColdStart(N0, "dram")
