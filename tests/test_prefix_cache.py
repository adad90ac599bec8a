"""Prefix (KV) caching: the block cache, the Mooncake block ids, the simulator's cached prefill, cache-aware routing.

The mechanism tests fail when it is switched off: with `EngineSpec.prefix_cache=False` no request has cached
tokens and TTFT does not fall; with plain tier-aware placement instead of `PrefixAware` the request goes to the
least busy instance, not to the one holding its prefix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.catalog import architecture
from core.decisions import Route
from core.errors import ConfigError, TraceFormatError
from core.metrics import prefix_cache_stats
from core.policies.placement import TierAware
from core.policies.prefix_aware import PrefixAware
from core.prefix_cache import PrefixCache
from core.spec_builders import cluster_from_dict, engine_from_dict
from core.specs import EngineSpec
from core.state import ClusterState, ClusterView
from core.workload.readers import read_mooncake
from core.workload.trace import Workload
from experiments.setup import build_policy
from sim.run import simulate
from tests.conftest import config

MODEL = "llama-3.2-1b"
DEPLOY = f"{MODEL}/ft-0"
TRACE = Path(__file__).resolve().parents[2] / "shared/data/traces/mooncake_fast25/conversation_trace.jsonl"


# ============================================================================ the cache
def test_lookup_finds_the_longest_cached_prefix_only() -> None:
    c = PrefixCache(10, block_tokens=4)
    c.insert([1, 2, 3])
    assert c.match([1, 2, 3, 4]) == 3
    assert c.match([1, 9, 3]) == 1  # a block past a missing one is useless
    assert c.match([5, 1, 2]) == 0  # a miss on the first block: nothing
    assert c.cached_tokens([1, 2, 3, 4], prompt_tokens=16) == 12
    # the last prompt token is always computed (its logits give the first output token)
    assert c.cached_tokens([1, 2, 3], prompt_tokens=12) == 11
    assert c.lookup([1, 2, 7], prompt_tokens=12) == 8
    assert c.hit_tokens == 8 and c.lookup_tokens == 12 and math.isclose(c.hit_rate, 8 / 12)


def test_lru_evicts_tails_before_the_shared_root() -> None:
    c = PrefixCache(4, block_tokens=1)
    c.insert([0, 1, 2])  # root 0, tail 1, 2
    c.insert([0, 3])  # 0 is touched again
    c.insert([5])  # over capacity: the least recent block goes, a tail (2), never the root
    assert len(c) == 4 and 0 in c and 2 not in c
    assert c.match([0, 1]) == 2 and c.match([0, 3]) == 2
    c.insert([7, 8, 9, 10, 11, 12])  # longer than the cache: only its leading blocks stay
    assert c.match([7, 8, 9, 10, 11]) == 4 and len(c) == 4


def test_capacity_from_kv_memory_and_zero_capacity() -> None:
    c = PrefixCache.from_kv_bytes(kv_budget_bytes=1_000_000, kv_bytes_per_token=100, frac=0.5, block_tokens=512)
    assert c.capacity_blocks == 9  # 5000 tokens -> 9 whole blocks
    eng = EngineSpec(prefix_cache=True, prefix_cache_blocks=3, prefix_block_tokens=16)
    assert PrefixCache.for_instance(1e9, 100, eng).capacity_tokens == 48
    empty = PrefixCache(0)
    empty.insert([1, 2])
    assert empty.match([1, 2]) == 0 and len(empty) == 0
    with pytest.raises(ConfigError):
        PrefixCache.from_kv_bytes(1e6, 100, frac=1.5)
    with pytest.raises(ConfigError):
        PrefixCache(-1)


# ============================================================================ workload: Mooncake block ids
def _write(path: Path, recs: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in recs) + "\n")
    return path


def test_mooncake_hash_ids_become_prefix_blocks_and_survive_transforms(tmp_path: Path) -> None:
    p = _write(tmp_path / "t.jsonl", [
        {"timestamp": 2000, "input_length": 1000, "output_length": 5, "hash_ids": [0, 3]},
        {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]},
        {"timestamp": 1000, "input_length": 700, "output_length": 5, "hash_ids": [0, 1, 2]},
    ])
    wl = read_mooncake(p)
    assert [tuple(b) for b in wl.prefix_blocks] == [(0, 1), (0, 1, 2), (0, 3)]  # sorted with the arrivals
    assert list(wl.prompt_tokens) == [600, 700, 1000]
    assert list(wl.window(0.5, 3.0).prefix_blocks) == [(0, 1, 2), (0, 3)]
    assert list(wl.time_scale(0.5).prefix_blocks) == list(wl.prefix_blocks)
    assert len(wl.subsample(1.0, seed=1).prefix_blocks) == 3
    assert list(wl.head(1).prefix_blocks) == [(0, 1)]
    other = Workload.from_columns([0.5], [10], [2])
    merged = wl.merge(other)
    assert list(merged.prefix_blocks) == [(0, 1), (), (0, 1, 2), (0, 3)]
    # a trace without hash_ids (and every generator) has no block column at all
    plain = read_mooncake(_write(tmp_path / "plain.jsonl", [{"timestamp": 0, "input_length": 5, "output_length": 1}]))
    assert plain.prefix_blocks is None and other.prefix_blocks is None


@pytest.mark.parametrize("bad", ['"abc"', "[1, -2]", "[1, 2.5]", "[true]", "{\"a\": 1}"])
def test_bad_hash_ids_name_the_file_and_line(tmp_path: Path, bad: str) -> None:
    p = _write(tmp_path / "bad.jsonl", [
        {"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [0]},
        f'{{"timestamp": 1, "input_length": 5, "output_length": 1, "hash_ids": {bad}}}',
    ])
    with pytest.raises(TraceFormatError) as exc:
        read_mooncake(p)
    assert "bad.jsonl" in str(exc.value) and "2" in str(exc.value) and "hash_ids" in str(exc.value)


# ============================================================================ the simulator
def _sharing_workload(with_blocks: bool = True) -> Workload:
    """4 conversations, 8 turns each, one every 3 s in turn: each turn's prompt is its conversation's 16 shared blocks
    (8192 tokens) plus 2 blocks of its own; every request alone on the warm instance after the first."""
    n = 32
    blocks = [tuple((i % 4) * 1000 + k for k in range(16)) for i in range(n)]
    prefix = [(*b, 100_000 + 2 * i, 100_000 + 2 * i + 1) for i, b in enumerate(blocks)]
    return Workload.from_columns(np.arange(n) * 3.0, [18 * 512 - 100] * n, [4] * n, model=DEPLOY,
                                 prefix_blocks=prefix if with_blocks else None)


def _sim(engine: EngineSpec, wl: Workload, nodes: int = 1, policy: str = "policy=mvp"):
    cfg = config("cluster=small")["cluster"]
    cfg["node_groups"][0]["count"] = nodes
    return simulate(cluster_from_dict(cfg), [architecture(MODEL, DEPLOY)], engine,
                    build_policy(config(policy)["policy"]), wl)


def test_prefix_cache_cuts_prefill_and_ttft_and_off_changes_nothing() -> None:
    wl = _sharing_workload()
    on = _sim(EngineSpec(prefix_cache=True, prefix_cache_blocks=200), wl)
    off = _sim(EngineSpec(), wl)
    r_on, r_off = on.requests, off.requests
    assert (r_on["outcome"] == "completed").all() and (r_off["outcome"] == "completed").all()
    # off: the mechanism is absent
    assert (r_off["cached_tokens"] == 0).all() and "prefix_hit_rate" not in off.summary
    # on: every turn after a conversation's first finds its 16 shared blocks
    assert (r_on["cached_tokens"].iloc[:4] == 0).all()
    assert (r_on["cached_tokens"].iloc[4:] == 16 * 512).all()
    assert on.summary["prefix_hit_rate"] > 0.6
    assert (r_on["prefill_s"].iloc[4:] < r_off["prefill_s"].iloc[4:] * 0.5).all()
    warm_on, warm_off = r_on["ttft_s"].iloc[4:], r_off["ttft_s"].iloc[4:]
    assert warm_on.mean() < warm_off.mean() * 0.6, (warm_on.mean(), warm_off.mean())


def test_prefix_cache_off_is_identical_to_a_workload_without_blocks() -> None:
    with_blocks = _sim(EngineSpec(), _sharing_workload(True))
    without = _sim(EngineSpec(), _sharing_workload(False))
    pd.testing.assert_frame_equal(with_blocks.requests, without.requests)
    drop = {"wall_s", "requests_per_wall_s"}
    assert {k: v for k, v in with_blocks.summary.items() if k not in drop} == {
        k: v for k, v in without.summary.items() if k not in drop}


def test_a_cache_too_small_for_the_prefix_gives_no_hit() -> None:
    on = _sim(EngineSpec(prefix_cache=True, prefix_cache_blocks=8), _sharing_workload())
    # 4 conversations x 18 blocks cycle through 8 blocks: LRU keeps only the latest prompt's head, never a match
    assert on.summary["prefix_hit_rate"] == 0.0
    assert prefix_cache_stats(on.requests)["cached_tokens"] == 0


def test_engine_prefix_options_are_read_from_config() -> None:
    e = engine_from_dict({"prefix_cache": True, "prefix_cache_frac": 0.25, "prefix_cache_blocks": 7})
    assert e.prefix_cache and e.prefix_cache_frac == 0.25 and e.prefix_cache_blocks == 7
    assert replace(e, prefix_cache=False).prefix_block_tokens == 512


# ============================================================================ cache-aware routing
@dataclass
class Req:
    id: int
    model: str = DEPLOY
    tenant: str = "t"
    prompt_tokens: int = 2048
    output_tokens: int = 4
    arrival_s: float = 0.0
    prefix_blocks: tuple[int, ...] = ()


class Clock:
    now = 0.0


def _two_instances() -> tuple[ClusterState, ClusterView, list]:
    cfg = config("cluster=small")
    state = ClusterState(cluster_from_dict(cfg["cluster"]), [architecture(MODEL, DEPLOY)],
                         engine_from_dict({**cfg["engine"], "prefix_cache": True}))
    insts = []
    for node in ("h100-0", "h100-1"):
        ns = state.nodes[node]
        n, per, kv = ns.footprint(state.models[DEPLOY])
        i = state.add_instance(DEPLOY, node, ns.gpu_fit(per * n, per), per, kv, "cloud", 0.0)
        i.status = "ready"
        insts.append(i)
    return state, ClusterView(state, Clock()), insts


def test_prefix_aware_routes_to_the_instance_holding_the_prefix() -> None:
    _, view, (a, b) = _two_instances()
    policy = PrefixAware(base=TierAware(), balance_slack=4)
    first = policy.place(Req(1, prefix_blocks=(1, 2, 3)), view)
    assert first == Route(a.id)  # both idle: the base's choice
    a.active = 2  # now busier than b, still within the slack
    assert TierAware().place(Req(2, prefix_blocks=(1, 2, 3, 4)), view) == Route(b.id)  # switched off: least busy
    assert policy.place(Req(2, prefix_blocks=(1, 2, 3, 4)), view) == Route(a.id)  # on: the prefix's holder
    assert policy.cached_blocks(a.id, (1, 2, 3, 4)) == 4
    # no shared prefix, or no block ids: the base decides
    assert policy.place(Req(3, prefix_blocks=(9,)), view) == Route(b.id)
    assert policy.place(Req(4), view) == Route(b.id)
    # past the slack, load balance wins over the cache
    a.active = 7
    assert policy.place(Req(5, prefix_blocks=(1, 2, 3)), view) == Route(b.id)


def test_prefix_aware_forgets_stopped_instances() -> None:
    state, view, (a, _b) = _two_instances()
    policy = PrefixAware()
    policy.place(Req(1, prefix_blocks=(1, 2)), view)
    assert policy.cached_blocks(a.id, (1, 2)) == 2
    state.remove_instance(a)
    policy.place(Req(2, prefix_blocks=(5,)), view)
    assert policy.cached_blocks(a.id, (1, 2)) == 0


def test_prefix_aware_yaml_builds_in_a_bundle() -> None:
    bundle = build_policy(config("policy=prefix_aware")["policy"])
    assert isinstance(bundle.placement, PrefixAware) and isinstance(bundle.placement.base, TierAware)
    assert bundle.placement.base.autoscaler is not None  # the scale-up test reaches the wrapped placement


@pytest.mark.skipif(not TRACE.exists(), reason="needs ../shared/data/traces (the Mooncake trace)")
def test_mooncake_hit_rate_off_on_and_with_routing() -> None:
    from experiments.prefix_cache import SCENARIO, run_one

    base = [*SCENARIO, f"workload.path={TRACE}", "workload.window=[0,300]", "+engine.prefix_cache_blocks=4000"]
    off = run_one([*base, "policy=seed_tiered"])
    on = run_one([*base, "policy=seed_tiered", "+engine.prefix_cache=true"])
    routed = run_one([*base, "policy=prefix_aware", "+engine.prefix_cache=true"])
    assert off["hit_rate"] == 0.0
    assert 0.0 < on["hit_rate"] < routed["hit_rate"]
    assert routed["warm_ttft_p50"] < off["warm_ttft_p50"]


@pytest.mark.parametrize("field,value", [("prefix_cache_frac", 1.5), ("prefix_cache_blocks", -1),
                                         ("prefix_block_tokens", 0)])
def test_bad_prefix_options_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"engine.{field}"):
        engine_from_dict({field: value})
