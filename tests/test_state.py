"""core/state.py: tier bookkeeping, GPU fitting and sizing, instances, the read-only view."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.catalog import ARCHITECTURES, architecture
from core.spec_builders import cluster_from_dict, engine_from_dict
from core.specs import TierSpec
from core.state import CapacityError, ClusterState, ClusterView, NodeState, TierState, gpus_needed
from tests.conftest import config

_CFG = config("cluster=small")
CLUSTER = cluster_from_dict(_CFG["cluster"])
ENGINE = engine_from_dict(_CFG["engine"])
NODE2 = CLUSTER.nodes[0]  # 2 x H100-80GB
NODE8 = dataclasses.replace(NODE2, name="big", n_gpus=8)
USABLE = 80e9 * 0.9


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now


def _tier(cap: float = 100.0) -> TierState:
    return TierState(TierSpec("nvme", capacity_bytes=cap, read_bw_Bps=1.0, write_bw_Bps=1.0))


def _put(t: TierState, model: str, nbytes: float, now: float = 0.0) -> None:
    t.reserve(model, nbytes)
    t.commit(model, now)


# =========================================================================== TierState
def test_reserve_commit_remove_bookkeeping():
    t = _tier(100.0)
    t.reserve("a", 30.0)
    assert t.incoming("a") and not t.holds("a")
    assert (t.used_bytes, t.reserved_bytes, t.free_bytes) == (0.0, 30.0, 70.0)
    t.commit("a", 5.0)
    assert t.holds("a") and not t.incoming("a")
    assert (t.used_bytes, t.reserved_bytes, t.free_bytes) == (30.0, 0.0, 70.0)
    e = t.entries["a"]
    assert (e.bytes, e.added_s, e.last_access_s, e.hits) == (30.0, 5.0, 5.0, 0)
    assert t.remove("a") == 30.0
    assert not t.holds("a") and t.used_bytes == 0.0 and t.free_bytes == 100.0


def test_abort_releases_the_reservation_and_keeps_nothing():
    t = _tier(100.0)
    t.reserve("a", 60.0)
    t.abort("a")
    assert not t.incoming("a") and not t.holds("a") and t.free_bytes == 100.0
    t.abort("never-reserved")  # harmless
    t.reserve("a", 100.0)  # the space really is back


def test_reserve_beyond_free_space_raises_and_changes_nothing():
    t = _tier(100.0)
    _put(t, "a", 60.0)
    t.reserve("b", 30.0)
    with pytest.raises(CapacityError, match="free 10"):
        t.reserve("c", 11.0)
    assert not t.incoming("c") and t.free_bytes == 10.0
    t.reserve("c", 10.0)  # exactly full is fine
    assert t.free_bytes == 0.0


def test_a_model_cannot_be_held_or_reserved_twice():
    t = _tier(100.0)
    _put(t, "a", 10.0)
    with pytest.raises(CapacityError, match="already held or incoming"):
        t.reserve("a", 10.0)
    t.reserve("b", 10.0)
    with pytest.raises(CapacityError, match="already held or incoming"):
        t.reserve("b", 10.0)
    assert t.reserved_bytes == 10.0 and t.used_bytes == 10.0


def test_commit_without_reservation_and_remove_of_absent_model_raise():
    t = _tier()
    with pytest.raises(KeyError):
        t.commit("a", 0.0)
    with pytest.raises(KeyError):
        t.remove("a")


def test_entries_are_read_only():
    t = _tier()
    _put(t, "a", 1.0)
    with pytest.raises(TypeError):
        t.entries["b"] = t.entries["a"]  # type: ignore[index]


def test_touch_and_lru_order():
    t = _tier()
    _put(t, "a", 1.0, now=1.0)
    _put(t, "b", 1.0, now=2.0)
    _put(t, "c", 1.0, now=3.0)
    assert t.lru_order() == ["a", "b", "c"]
    t.touch("a", 10.0)
    assert t.lru_order() == ["b", "c", "a"]
    assert t.entries["a"].hits == 1 and t.entries["a"].last_access_s == 10.0
    t.touch("b", 10.0)  # same time: ties broken by name
    assert t.lru_order() == ["c", "a", "b"]
    t.touch("zzz", 11.0)  # not held: ignored
    assert "zzz" not in t.entries


_OPS = st.lists(
    st.tuples(st.sampled_from(["reserve", "commit", "abort", "remove", "touch"]), st.sampled_from("abcde"),
              st.floats(0.0, 60.0)),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(_OPS)
def test_tier_capacity_is_never_exceeded(ops):
    cap = 100.0
    t = _tier(cap)
    model_bytes: dict[str, float] = {}
    for op, m, x in ops:
        if op == "reserve":
            ok = not t.holds(m) and not t.incoming(m) and x <= t.free_bytes + 1e-6
            try:
                t.reserve(m, x)
            except CapacityError:
                assert not ok
            else:
                assert ok
                model_bytes[m] = x
        elif op == "commit" and t.incoming(m):
            t.commit(m, x)
        elif op == "abort":
            t.abort(m)
        elif op == "remove" and t.holds(m):
            assert t.remove(m) == model_bytes[m]
        elif op == "touch":
            t.touch(m, x)
        assert t.used_bytes + t.reserved_bytes <= cap + 1e-6
        assert t.used_bytes == pytest.approx(sum(e.bytes for e in t.entries.values()))
        assert not (set(t.entries) & set(t.reserved))


# =========================================================================== sizing and fitting
@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        # weights x 1.5 (KV reserve) on 72 GB usable per 80 GB GPU
        ("llama-3.2-1b", (1, 3.72e9, 1.24e9)),
        ("llama-3.1-8b", (1, 24.09e9, 8.03e9)),
        ("llama-3.1-70b", (4, 211.8e9 / 4, 70.6e9)),  # 211.8 GB > 2 x 72: four GPUs
        ("qwen2.5-32b", (2, 98.4e9 / 2, 32.8e9)),
    ],
)
def test_gpus_needed_on_an_8_gpu_node(arch, expected):
    n, per, kv = gpus_needed(architecture(arch), NODE8, ENGINE)
    assert n == expected[0]
    assert per == pytest.approx(expected[1]) and kv == pytest.approx(expected[2])


def test_gpus_needed_capped_by_the_node_shrinks_kv():
    # 70B on a 2-GPU node: 2 x 72 GB = 144 GB, weights 141.2 GB, so only 2.8 GB of KV
    n, per, kv = gpus_needed(architecture("llama-3.1-70b"), NODE2, ENGINE)
    assert (n, per, kv) == (2, pytest.approx(USABLE), pytest.approx(2.8e9))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_gpus_needed_is_a_power_of_two_and_holds_the_weights(arch):
    m = architecture(arch)
    n, per, kv = gpus_needed(m, NODE8, ENGINE)
    assert n in (1, 2, 4, 8)
    assert per <= USABLE + 1e-3
    assert n * per == pytest.approx(m.weights_bytes + kv)
    if n > 1:
        assert (n // 2) * USABLE < m.weights_bytes * 1.5  # the fewest GPUs that hold it


def _node(free: list[float]) -> NodeState:
    ns = NodeState(dataclasses.replace(NODE2, n_gpus=len(free)), ENGINE)
    ns.gpu_free_bytes = list(free)
    return ns


def test_gpu_fit_single_gpu_is_best_fit():
    ns = _node([50.0, 30.0, 72.0])
    assert ns.gpu_fit(25.0, 25.0) == (1,)  # the smallest hole that holds it
    assert ns.gpu_fit(40.0, 40.0) == (0,)
    assert ns.gpu_fit(72.0, 72.0) == (2,)
    assert ns.gpu_fit(73.0, 73.0) is None


def test_gpu_fit_multi_gpu_takes_the_tightest_gpus_that_each_hold_a_shard():
    ns = _node([72.0, 40.0, 35.0, 20.0])
    assert set(ns.gpu_fit(60.0, 30.0)) == {1, 2}
    assert set(ns.gpu_fit(72.0, 36.0)) == {0, 1}
    assert ns.gpu_fit(108.0, 36.0) is None  # three shards of 36 GB, only two GPUs have room
    assert ns.gpu_fit(120.0, 40.0) is None  # only two GPUs have 40 free, though 167 are free in all
    assert set(ns.gpu_fit(80.0, 20.0)) == {0, 1, 2, 3}


def test_tier_holding_and_local_source():
    state = ClusterState(CLUSTER, [architecture("llama-3.2-1b", "a")], ENGINE)
    ns = state.nodes["h100-0"]
    assert ns.tier_holding("a") is None and ns.local_source("a") == "cloud"
    for tier in ("sata", "nvme", "dram"):
        _put(ns.tiers[tier], "a", 2.48e9)
        assert ns.tier_holding("a") == tier and ns.local_source("a") == tier
    inst = state.add_instance("a", "h100-0", (0,), 3.72e9, 1.24e9, "dram", 0.0)
    assert ns.tier_holding("a") == "gpu" and ns.local_source("a") == "dram"
    inst.status = "stopping"
    assert ns.tier_holding("a") == "dram"


def test_footprint_is_gpus_needed():
    state = ClusterState(CLUSTER, [architecture("llama-3.1-70b")], ENGINE)
    ns = state.nodes["h100-1"]
    m = state.models["llama-3.1-70b"]
    assert ns.footprint(m) == gpus_needed(m, NODE2, ENGINE)
    assert ns.gpu_free_bytes == [USABLE, USABLE]


# =========================================================================== ClusterState
_MODELS = [architecture(b) for b in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-14b", "qwen2.5-32b",
                                      "llama-3.1-70b")]


def _add(state: ClusterState, model: str, node: str = "h100-0", now: float = 0.0):
    ns = state.nodes[node]
    n, per, kv = ns.footprint(state.models[model])
    ids = ns.gpu_fit(per * n, per)
    assert ids is not None
    return state.add_instance(model, node, ids, per, kv, "cloud", now)


def test_add_and_remove_instance_bookkeeping():
    state = ClusterState(CLUSTER, _MODELS, ENGINE)
    ns = state.nodes["h100-0"]
    a = _add(state, "llama-3.1-8b")
    b = _add(state, "llama-3.1-8b")
    assert a.id != b.id
    assert ns.gpu_free_bytes == pytest.approx([USABLE - 2 * 24.09e9, USABLE])  # best fit stacks them on GPU 0
    assert state.instances_by_model["llama-3.1-8b"] == [a, b]
    assert ns.instances == {a.id: a, b.id: b} and state.instances == {a.id: a, b.id: b}
    assert a.status == "loading" and a.gpu_bytes == pytest.approx(24.09e9)
    assert a.kv_budget_bytes == pytest.approx(8.03e9)
    assert a.max_num_seqs == ENGINE.max_num_seqs
    state.remove_instance(a)
    assert a.status == "stopped"
    assert state.instances_by_model["llama-3.1-8b"] == [b] and a.id not in ns.instances
    assert a.id not in state.instances


def test_add_instance_over_capacity_raises_and_changes_nothing():
    state = ClusterState(CLUSTER, _MODELS, ENGINE)
    ns = state.nodes["h100-0"]
    _add(state, "qwen2.5-14b")  # 44.1 GB on one GPU
    before = list(ns.gpu_free_bytes)
    with pytest.raises(CapacityError):
        state.add_instance("qwen2.5-32b", "h100-0", (0, 1), 49.2e9, 32.8e9, "cloud", 0.0)
    assert ns.gpu_free_bytes == before and len(state.instances) == 1
    assert state.instances_by_model["qwen2.5-32b"] == []


def test_seventy_b_fills_a_small_node_and_frees_it_exactly():
    state = ClusterState(CLUSTER, _MODELS, ENGINE)
    ns = state.nodes["h100-1"]
    inst = _add(state, "llama-3.1-70b", node="h100-1")
    assert set(inst.gpu_ids) == {0, 1} and ns.gpu_free_bytes == [0.0, 0.0]
    assert ns.gpu_fit(3.72e9, 3.72e9) is None
    state.remove_instance(inst)
    assert ns.gpu_free_bytes == [USABLE, USABLE]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([m.name for m in _MODELS]), max_size=8), st.randoms(use_true_random=False))
def test_add_then_remove_in_any_order_restores_gpu_memory_exactly(models, rnd):
    state = ClusterState(CLUSTER, _MODELS, ENGINE)
    ns = state.nodes["h100-0"]
    initial = list(ns.gpu_free_bytes)
    insts = []
    for m in models:
        n, per, kv = ns.footprint(state.models[m])
        ids = ns.gpu_fit(per * n, per)
        if ids is not None:
            insts.append(state.add_instance(m, "h100-0", ids, per, kv, "cloud", 0.0))
        assert all(f >= -1e-6 for f in ns.gpu_free_bytes)
    rnd.shuffle(insts)
    for inst in insts:
        state.remove_instance(inst)
    assert ns.gpu_free_bytes == initial
    assert state.instances == {} and all(v == [] for v in state.instances_by_model.values())


def test_failed_add_instance_leaves_gpu_memory_untouched():
    state = ClusterState(CLUSTER, _MODELS, ENGINE)
    ns = state.nodes["h100-0"]
    with pytest.raises(KeyError):
        state.add_instance("no-such-model", "h100-0", (0,), 10e9, 0.0, "cloud", 0.0)
    assert ns.gpu_free_bytes == [USABLE, USABLE]


def test_add_instance_rejects_a_repeated_gpu():
    state = ClusterState(CLUSTER, _MODELS, ENGINE)
    ns = state.nodes["h100-0"]
    with pytest.raises(CapacityError):
        state.add_instance("qwen2.5-32b", "h100-0", (0, 0), 49.2e9, 32.8e9, "cloud", 0.0)
    assert min(ns.gpu_free_bytes) >= 0.0


# =========================================================================== ClusterView
def test_view_reads_the_clock_and_the_live_state_read_only():
    state = ClusterState(CLUSTER, _MODELS, ENGINE)
    clock = Clock(12.5)
    view = ClusterView(state, clock)
    assert view.now_s == 12.5
    clock.now = 30.0
    assert view.now_s == 30.0
    assert list(view.node_names()) == ["h100-0", "h100-1"]
    assert view.engine is ENGINE and view.cluster is CLUSTER
    assert view.model("llama-3.1-8b").params_b == 8.03
    assert view.instances_of("unknown") == ()
    inst = _add(state, "llama-3.2-1b", node="h100-1")
    assert view.instances_of("llama-3.2-1b") == [inst] and view.instances[inst.id] is inst  # a window, not a copy
    with pytest.raises(TypeError):
        view.nodes["x"] = state.nodes["h100-0"]  # type: ignore[index]
    with pytest.raises(TypeError):
        view.instances["x"] = inst  # type: ignore[index]
    with pytest.raises(TypeError):
        view.models["x"] = inst.model  # type: ignore[index]


def test_view_locations_give_the_fastest_tier_per_node():
    state = ClusterState(CLUSTER, _MODELS, ENGINE)
    view = ClusterView(state, Clock())
    m = "llama-3.2-3b"
    assert view.locations(m) == {}
    _put(state.nodes["h100-0"].tiers["sata"], m, 6.42e9)
    _put(state.nodes["h100-0"].tiers["nvme"], m, 6.42e9)
    _put(state.nodes["h100-1"].tiers["sata"], m, 6.42e9)
    assert view.locations(m) == {"h100-0": "nvme", "h100-1": "sata"}
    _add(state, m, node="h100-1")
    assert view.locations(m) == {"h100-0": "nvme", "h100-1": "gpu"}

