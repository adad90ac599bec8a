"""End-to-end simulator behaviour on real traces and the shipped configs."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from core.errors import ConfigError
from experiments.simulate import run
from tests.conftest import REPO, config


def _run(*overrides: str, out=None):
    return run(config(*overrides), out)


def test_every_request_ends_in_exactly_one_outcome():
    res = _run("cluster=small", "workload.max_requests=3000")
    req = res.requests
    s = res.summary
    assert s["requests"] == len(req) == 3000
    assert s["completed"] + s["rejected"] + s["failed"] == s["requests"]
    assert set(req["outcome"].unique()) <= {"completed", "rejected", "failed"}
    # every non-completed request says why
    assert (req.loc[req["outcome"] != "completed", "reason"].str.len() > 0).all()
    assert req["request_id"].is_unique
    done = req[req["outcome"] == "completed"]
    assert (done["ttft_s"] > 0).all() and (done["e2e_s"] >= done["ttft_s"]).all()


def test_same_config_and_seed_give_identical_records():
    a = _run("policy=seed_tiered", "workload.max_requests=2000")
    b = _run("policy=seed_tiered", "workload.max_requests=2000")
    pd.testing.assert_frame_equal(a.requests, b.requests)
    pd.testing.assert_frame_equal(a.moves, b.moves)
    pd.testing.assert_frame_equal(a.instances, b.instances)
    c = _run("policy=seed_tiered", "workload.max_requests=2000", "seed=7")
    assert not a.requests["model"].equals(c.requests["model"])


def test_cold_starts_carry_their_phases_and_source_tier():
    res = _run("policy=seed_tiered")
    req = res.requests
    cold = req[req["cold_start"] & (req["outcome"] == "completed")]
    assert len(cold) > 0
    assert set(cold["source_tier"]) <= {"dram", "nvme", "sata", "cloud"}
    assert (cold["to_gpu_s"] > 0).all() and (cold["engine_init_s"] >= 0).all()
    fetched = cold[cold["source_tier"] != "dram"]
    assert (fetched["fetch_s"] > 0).all()
    # a cloud fetch of W bytes at 16 x 93 MB/s cannot beat W / 1.488 GB/s
    from core.catalog import architecture

    base = cold["model"].str.split("/").str[0]
    w = base.map(lambda b: architecture(b).weights_bytes)
    cloud = cold["source_tier"] == "cloud"
    assert (cold.loc[cloud, "fetch_s"] >= w[cloud] / (16 * 93e6) - 1e-6).all()
    warm = req[~req["cold_start"] & (req["outcome"] == "completed")]
    assert (warm["source_tier"] == "gpu").all() and warm["fetch_s"].isna().all()


def test_tiered_policies_beat_mvp_on_mean_cold_start():
    """Azure code trace over the 24-deployment catalog on the medium cluster, averaged over seeds 0-3
    (the seed draws the Zipf model assignment; single seeds vary, see the closing note of issue 2)."""
    means = {}
    for policy in ("mvp", "seed_tiered", "sllm"):
        runs = [_run(f"policy={policy}", f"seed={seed}", "output.plots=false").summary["cold_start_s"]["mean"]
                for seed in range(4)]
        means[policy] = sum(runs) / len(runs)
    assert means["seed_tiered"] < means["mvp"]
    assert means["sllm"] < means["mvp"]


def test_outputs_written(tmp_path):
    res = _run("workload.max_requests=1500", out=tmp_path)
    for f in ("records.parquet", "tier_moves.parquet", "instances.parquet", "summary.json",
              "cold_start_cdf.png", "cost_breakdown.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("requests", "completed", "rejected", "failed", "cold_starts", "cold_start_s", "cold_start_by_tier",
                "ttft_s", "tpot_s", "slo_attainment", "gpu_hours", "cost_usd", "memory_waste_frac", "sim_s",
                "wall_s", "requests_per_wall_s"):
        assert key in summary, key
    assert set(summary["cold_start_s"]) >= {"mean", "p50", "p90", "p99"}
    back = pd.read_parquet(tmp_path / "records.parquet")
    pd.testing.assert_frame_equal(back, res.requests, check_dtype=False)
    assert summary["gpu_hours"] > 0 and summary["cost_usd"] > 0


@pytest.mark.parametrize("policy", ["mvp", "seed_tiered", "sllm", "predictive"])
def test_every_policy_runs_on_every_world(policy):
    res = _run(f"policy={policy}", "cluster=small", "models=small", "workload.max_requests=1500")
    assert res.summary["completed"] > 0
    assert res.summary["policy"] == policy


def test_sllm_with_live_migration_runs_and_moves_instances():
    res = _run("policy=sllm", "policy.placement.migration=true", "cluster=small", "workload.max_requests=3000")
    s = res.summary
    assert s["completed"] + s["rejected"] + s["failed"] == s["requests"]


def test_progressive_loading_lowers_cold_start():
    base = ("policy=seed_tiered", "workload.max_requests=3000")
    prog = _run(*base, "policy.progressive=true").summary["cold_start_s"]["mean"]
    flat = _run(*base, "policy.progressive=false").summary["cold_start_s"]["mean"]
    assert prog < flat


def test_counting_loading_instances_avoids_over_scaling():
    kw = ("policy=mvp", "workload=gamma", "workload.options.duration_s=600", "workload.options.rate_per_s=20")
    good = _run(*kw).summary["instances_started"]
    naive = _run(*kw, "policy.autoscaling.count_loading=false").summary["instances_started"]
    assert good < naive


# ----------------------------------------------------------------------------- bad input
def test_unknown_policy_name_fails_before_running():
    proc = subprocess.run([sys.executable, "-m", "experiments.simulate", "policy=nope", "hydra.run.dir=/tmp/tl_bad"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "policy/nope" in proc.stderr and "mvp" in proc.stderr  # names the choice and the options


def test_unknown_policy_class_names_the_field():
    with pytest.raises(ConfigError, match=r"policy\.placement\._target_"):
        _run("policy.placement._target_=core.policies.placement.Nope")


def test_malformed_trace_row_names_file_and_line(tmp_path):
    bad = tmp_path / "trace.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,10,5\n"
                   "2023-11-16 18:17:04.0000000,ten,5\n")
    proc = subprocess.run([sys.executable, "-m", "experiments.simulate", "scenario=smoke", f"workload.path={bad}",
                           "hydra.run.dir=" + str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert f"{bad}:3" in proc.stderr
    assert not (tmp_path / "out" / "records.parquet").exists()


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("cluster.node_groups.0.tiers.nvme.read_bw_Bps=0", r"tiers\.nvme\.read_bw_Bps must be a positive"),
        ("cluster.node_groups.0.tiers.sata.write_bw_Bps=-5", r"tiers\.sata\.write_bw_Bps must be a positive"),
        ("cluster.node_groups.0.nic_Bps=0", r"nic_Bps must be a positive"),
        ("cluster.node_groups.0.tiers.dram.capacity_bytes=1e9", r"tier 'dram' .* smaller than every model"),
        ("cluster.node_groups.0.gpu.mem_bytes=10e9", r"models\.bases: .* larger than every node"),
    ],
)
def test_bad_cluster_values_are_rejected_with_the_field(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _run(override)


def test_model_larger_than_every_tier_is_rejected():
    with pytest.raises(ConfigError, match=r"models\.bases: .*llama-3.1-70b.*larger than every node"):
        _run("cluster=small", "cluster.node_groups.0.n_gpus=1")


def test_summary_counts_match_records():
    res = _run("policy=sllm", "workload.max_requests=2500")
    req, s = res.requests, res.summary
    assert s["cold_starts"] == int(req["cold_start"].sum())
    by_tier = sum(v["count"] for v in s["cold_start_by_tier"].values())
    assert by_tier == int((req["cold_start"] & (req["outcome"] == "completed")).sum())
    # requests carry the GPU cost of the instances that served them; idle keep-alive time is nobody's
    assert 0 < req["cost_usd"].sum() <= s["cost_breakdown_usd"]["gpu"] + 1e-9


def test_multirun_sweep_writes_one_output_per_job(tmp_path):
    import shutil

    exe = shutil.which("tierlab-simulate")
    assert exe, "the console script is installed with the package"
    proc = subprocess.run([exe, "--multirun", "policy=mvp,sllm", "cluster=small,medium", "workload.max_requests=300",
                           "progress=false", "output.plots=false", f"hydra.sweep.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 4
    policies = sorted(json.loads(p.read_text())["policy"] for p in summaries)
    assert policies == ["mvp", "mvp", "sllm", "sllm"]
    assert proc.stdout.count("simulated ") == 4


def test_measured_table_overrides_the_roofline():
    """inference=measured_example times llama-3.1-8b deployments from the table instead of the roofline."""
    kw = ("workload.max_requests=1500", "output.plots=false")
    roof = _run(*kw).requests
    meas = _run(*kw, "inference=measured_example").requests
    is8b = roof["model"].str.startswith("llama-3.1-8b/") & (roof["outcome"] == "completed")
    other = ~roof["model"].str.startswith("llama-3.1-8b/") & (roof["outcome"] == "completed")
    # table: 20,000 prefill tokens/s
    expect = meas.loc[is8b, "prompt_tokens"] / 20000.0
    assert (meas.loc[is8b, "prefill_s"] - expect).abs().max() < 1e-9
    assert not (roof.loc[is8b, "prefill_s"] - expect).abs().lt(1e-9).all()
    pd.testing.assert_series_equal(roof.loc[other, "prefill_s"], meas.loc[other, "prefill_s"])
