"""Scenarios (conf/scenario), the warm-up cut (metrics.warmup_s) and initial tier states (sim.initial_state)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.errors import ConfigError
from core.workload.embedded import embedded_path
from core.workload.readers import read_servegen
from experiments.setup import build
from experiments.simulate import one_line, run
from tests.conftest import config

SCENARIOS = ("smoke", "serverless", "bursty")
LOCAL = ("dram", "nvme", "sata")
# the serverless scenario's first three hours: the night's peak, ~5k requests, a second or two to simulate
SHORT = ("scenario=serverless", "workload.window=[0,10800]")


def _evicted_tiers(moves: pd.DataFrame) -> set[str]:
    return set(moves.loc[moves["kind"] == "evict", "from_tier"])


# ------------------------------------------------------------------------------------------ scenarios
@pytest.mark.parametrize("name", SCENARIOS)
def test_each_scenario_builds(name):
    s = build(config(f"scenario={name}"))
    assert len(s.workload) > 0 and s.models
    if name == "smoke":  # the default before issue 11, unchanged
        assert (len(s.models), len(s.workload), len(s.cluster.nodes)) == (24, 8819, 4)


def test_serverless_has_hundreds_of_deployments_and_more_weights_than_gpu_memory():
    s = build(config("scenario=serverless"))
    weights = sum(m.weights_bytes for m in s.models)
    gpu = sum(n.gpu_mem_bytes for n in s.cluster.nodes)
    assert len(s.models) > 200
    assert weights > 3 * gpu
    assert s.workload.duration_s >= 86_000  # a day: keep-alive expiry and the diurnal swing
    # every tier of every node is smaller than the catalog: each one must evict
    for node in s.cluster.nodes:
        assert {t: tier.capacity_bytes < weights for t, tier in node.tiers.items()} == dict.fromkeys(LOCAL, True)
    assert {m.base for m in s.models} >= {"llama-3.2-1b", "llama-3.1-70b"}
    # every client's fine-tunes are in the catalog, requested or not: a slice has the same catalog (and specs)
    short = build(config(*SHORT))
    assert [(m.name, m.base) for m in short.models] == [(m.name, m.base) for m in s.models]
    assert len(set(short.workload.model.tolist())) < len(short.models)


def test_the_default_command_runs_the_serverless_scenario():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # no overrides: config.yaml's defaults
        bare = OmegaConf.to_container(compose("config"), resolve=True)
    serverless = config("scenario=serverless")
    serverless["progress"] = bare["progress"]
    assert bare == serverless


def test_a_short_serverless_run_evicts_at_every_tier_and_cold_starts_from_three():
    tiered = run(config(*SHORT, "policy=seed_tiered"), None)
    sllm = run(config(*SHORT, "policy=sllm"), None)
    # seed_tiered writes downloads to SATA and demotes to NVMe; sllm keeps a DRAM pool and downloads to NVMe
    assert _evicted_tiers(tiered.moves) | _evicted_tiers(sllm.moves) == set(LOCAL)
    for res in (tiered, sllm):
        tiers = set(res.summary["cold_start_by_tier"]) - {"gpu"}
        assert len(tiers) >= 3, (res.summary["policy"], res.summary["cold_start_by_tier"])
    line = one_line(tiered.summary)
    assert all(f"{t} {row['count']}" in line for t, row in tiered.summary["cold_start_by_tier"].items())


def test_same_config_and_seed_give_identical_records():
    cfg = config(*SHORT[:1], "workload.window=[0,7200]", "policy=sllm")
    a, b = run(cfg, None), run(cfg, None)
    pd.testing.assert_frame_equal(a.requests, b.requests)
    pd.testing.assert_frame_equal(a.moves, b.moves)
    assert a.final_state == b.final_state


def test_variants_per_client_spread_a_clients_requests_and_keep_its_arrivals():
    path = embedded_path("servegen_deepseek_r1")
    one = read_servegen(path, 3, end_s=7200, rate_scale=0.05)
    five = read_servegen(path, 3, end_s=7200, rate_scale=0.05, variants_per_client=5)
    np.testing.assert_array_equal(one.arrival_s, five.arrival_s)
    np.testing.assert_array_equal(one.prompt_tokens, five.prompt_tokens)
    assert [m.rsplit("/ft-", 1)[0] for m in five.model] == list(one.model)  # each variant is of its own client
    assert len(five.catalog) == 5 * 73 and one.catalog == ()
    ranks = pd.Series([int(m.rsplit("-", 1)[1]) for m in five.model]).value_counts()
    assert ranks.index[0] == 0 and ranks.is_monotonic_decreasing  # Zipf within the client: ft-0 first
    with pytest.raises(ConfigError, match="variants_per_client"):
        read_servegen(path, 3, end_s=600, variants_per_client=0)


def test_a_catalog_that_fits_no_node_names_the_field():
    with pytest.raises(ConfigError, match=r"models\.bases: .*fit on no node.*llama-3\.1-70b"):
        build(config("scenario=serverless", "cluster=small", "cluster.node_groups.0.n_gpus=1"))


# ---------------------------------------------------------------------------------------------- warm-up
_WARM = ("cluster=small", "models=small", "workload.max_requests=1200", "policy=seed_tiered")


def test_warmup_excludes_early_requests_and_counts_cost_from_then_on():
    whole = run(config(*_WARM), None)
    w = float(whole.requests["arrival_s"].quantile(0.3))
    cut = run(config(*_WARM, f"metrics.warmup_s={w}"), None)
    s = cut.summary
    # the same simulation; the measured part is what arrived from `w` on
    early = whole.requests["arrival_s"] < w
    assert s["requests"] == len(cut.requests) == int((~early).sum())
    assert s["warmup_requests"] == int(early.sum()) and s["warmup_s"] == w
    assert (cut.requests["arrival_s"] >= w).all()
    kept = whole.requests[~early].reset_index(drop=True)
    pd.testing.assert_frame_equal(cut.requests.drop(columns="cost_usd"), kept.drop(columns="cost_usd"))
    assert s["cold_starts"] == int(kept["cold_start"].sum())
    assert s["completed"] == int((kept["outcome"] == "completed").sum())
    # costs from `w` on: less GPU time and fleet time than the whole run, the fleet exactly (end - w)
    assert 0 < s["gpu_hours"] < whole.summary["gpu_hours"]
    assert s["fleet_node_hours"] == pytest.approx(2 * (s["sim_s"] - w) / 3600)
    assert s["cost_usd"] < whole.summary["cost_usd"]
    assert sum(s["loads_by_tier"].values()) <= sum(whole.summary["loads_by_tier"].values())
    pd.testing.assert_frame_equal(cut.moves, whole.moves)  # the state's history is the whole run's


def test_warmup_zero_is_the_run_without_one():
    a = run(config(*_WARM), None)
    b = run(config(*_WARM, "metrics.warmup_s=0"), None)
    pd.testing.assert_frame_equal(a.requests, b.requests)
    assert {k: v for k, v in a.summary.items() if k != "wall_s" and "per_wall" not in k} == \
        {k: v for k, v in b.summary.items() if k != "wall_s" and "per_wall" not in k}
    assert "warmup_s" not in a.summary


@pytest.mark.parametrize("value", ["1e9", "3436", "-5"])
def test_a_warmup_as_long_as_the_trace_is_an_error_before_the_run(value, tmp_path):
    with pytest.raises(ConfigError, match=r"metrics\.warmup_s"):
        run(config(f"metrics.warmup_s={value}"), tmp_path)
    assert not (tmp_path / "summary.json").exists()


# ----------------------------------------------------------------------------------------- initial state
_STATE = ("cluster=small", "models=small", "workload.max_requests=800", "policy=seed_tiered")


def test_final_state_round_trip(tmp_path):
    a = run(config(*_STATE), tmp_path / "a")
    path = tmp_path / "a" / "final_state.json"
    state = json.loads(path.read_text())
    assert state == json.loads(json.dumps(a.final_state))
    held = {(node, tier): [r["model"] for r in rows] for node, tiers in state["nodes"].items()
            for tier, rows in tiers.items()}
    models = {m for ms in held.values() for m in ms}
    assert models, "run A left nothing in the tiers"
    assert state["catalog"]["deployments"] == 9  # models=small: 3 bases x 3 fine-tunes

    b = run(config(*_STATE, f"sim.initial_state={path}"), tmp_path / "b")
    first = b.requests.sort_values("arrival_s").groupby("model").head(1).set_index("model")
    again_requested = [m for m in sorted(models) if m in first.index]
    assert again_requested
    for model in again_requested:  # loaded from where run A left it, not fetched from the cloud
        row = first.loc[model]
        assert row["cold_start"] and row["source_tier"] in LOCAL, (model, row["source_tier"])
    cold_a = a.requests.sort_values("arrival_s").groupby("model").head(1).set_index("model")
    assert (cold_a.loc[again_requested, "source_tier"] == "cloud").all()  # run A had fetched them
    initial = b.moves[b.moves["kind"] == "initial"]
    assert len(initial) == sum(len(ms) for ms in held.values())
    assert (initial["time_s"] == 0).all() and (initial["from_tier"] == "").all()
    # the same start, twice: the same run
    again = run(config(*_STATE, f"sim.initial_state={path}"), None)
    pd.testing.assert_frame_equal(b.requests, again.requests)


def test_an_initial_state_from_another_catalog_or_cluster_is_an_error(tmp_path):
    run(config(*_STATE), tmp_path / "a")
    path = tmp_path / "a" / "final_state.json"
    with pytest.raises(ConfigError, match=rf"sim\.initial_state: {path}: model .* not in this run's catalog"):
        build(config("cluster=small", "models=bursty", f"sim.initial_state={path}"))
    with pytest.raises(ConfigError, match=rf"sim\.initial_state: {path}: node .* not in this cluster"):
        build(config("cluster=medium", "models=small", f"sim.initial_state={path}"))
    with pytest.raises(ConfigError, match=r"sim\.initial_state: .*cannot read"):
        build(config(*_STATE, f"sim.initial_state={tmp_path / 'nope.json'}"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ConfigError, match=rf"sim\.initial_state: {bad}: not a tierlab final state"):
        build(config(*_STATE, f"sim.initial_state={bad}"))


def test_policy_initial_state_hook(tmp_path):
    from core.decisions import Copy
    from sim.run import simulate

    s = build(config(*_STATE, "sim.initial_state=policy"))
    assert s.initial_state == "policy"
    model = s.models[0].name
    node = s.cluster.nodes[0].name
    s.policy.caching.initial_state = lambda view: [Copy(model, node, "nvme")]  # a policy's own pre-population
    res = simulate(s.cluster, s.models, s.engine, s.policy, s.workload, initial_state=s.initial_state)
    initial = res.moves[res.moves["kind"] == "initial"]
    assert list(zip(initial["model"], initial["node"], initial["to_tier"], strict=True)) == [(model, node, "nvme")]
    # without a hook: nothing
    plain = build(config(*_STATE, "sim.initial_state=policy"))
    res = simulate(plain.cluster, plain.models, plain.engine, plain.policy, plain.workload, initial_state="policy")
    assert not (res.moves["kind"] == "initial").any()


def test_the_final_state_file_is_json_with_catalog_identity(tmp_path):
    run(config(*_STATE), tmp_path)
    data = json.loads(Path(tmp_path / "final_state.json").read_text())
    assert data["format"] == "tierlab.final_state/1"
    assert set(data["catalog"]) == {"deployments", "digest"}
    assert set(data["nodes"]) == {"h100-0", "h100-1"}  # cluster=small
    assert all(set(tiers) == set(LOCAL) for tiers in data["nodes"].values())
