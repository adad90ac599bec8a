"""experiments.compare: the bootstrap statistics, determinism of the runs, and the report's structure."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError
from experiments import compare, compare_report
from experiments.compare_stats import HIGHER, LOWER, NA, SAME, judge_ratio, mean_ci, paired

TINY = """
policies: [mvp, sllm]
seeds: [0, 1]
workers: 1
common: [cluster=small, "workload.window=[0,60]"]
scenarios:
  tiny: []
  tiny_short_keep: [policy.autoscaling.keep_alive_s=10, "workload.window=[0,240]"]
targets:
  - {a: sllm, b: mvp, metric: cold_mean_s, max_ratio: 0.2, text: ">= 5x lower"}
notes: "- a *note* on mechanisms"
"""


def tiny_settings(tmp_path: Path, **kw) -> compare.Settings:
    path = tmp_path / "compare.yaml"
    path.write_text(TINY)
    return compare.load_settings(path, **kw)


# ============================================================================ statistics
def test_mean_ci_is_deterministic_and_brackets_the_mean():
    x = [3.0, 5.0, 4.0, 6.0, 2.0]
    a, b = mean_ci(x), mean_ci(x)
    assert a == b
    assert a.value == pytest.approx(4.0)
    assert a.lo < 4.0 < a.hi
    assert a.lo >= 2.0 and a.hi <= 6.0


def test_mean_ci_drops_undefined_seeds_and_needs_two():
    assert mean_ci([None, 2.0, float("nan"), 4.0]).value == pytest.approx(3.0)
    one = mean_ci([None, 7.0])
    assert one.value == 7.0 and one.lo is None and one.n == 1
    assert mean_ci([None, None]).value is None


def test_paired_detects_a_known_difference_despite_seed_spread():
    rng = np.random.default_rng(1)
    trace = rng.uniform(10, 100, size=6)  # seed-to-seed spread much larger than the effect
    b = trace + rng.normal(0, 0.5, size=6)
    a = 0.8 * trace + rng.normal(0, 0.5, size=6)
    p = paired(list(a), list(b))
    assert p.diff_verdict == LOWER and p.ratio_verdict == LOWER
    assert p.ratio.hi < 1.0 and p.ratio.lo == pytest.approx(0.8, abs=0.05)
    q = paired(list(b), list(a))
    assert q.diff_verdict == HIGHER and q.ratio_verdict == HIGHER
    # unpaired intervals of the two means overlap: only the pairing shows the difference
    ma, mb = mean_ci(list(a)), mean_ci(list(b))
    assert ma.hi > mb.lo


def test_identical_policies_give_no_difference():
    x = [12.0, 30.0, 7.5, 18.0]
    p = paired(x, list(x))
    assert p.diff_verdict == SAME and p.ratio_verdict == SAME
    assert p.diff.lo == p.diff.hi == 0.0 and p.ratio.value == 1.0
    noisy = paired([12.0, 30.0, 7.5, 18.0], [12.5, 29.0, 8.0, 17.5])
    assert noisy.ratio_verdict == SAME and noisy.ratio.lo < 1.0 < noisy.ratio.hi


def test_paired_edge_cases():
    z = paired([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    assert z.diff_verdict == SAME and z.ratio_verdict == NA  # ratio of zero means is undefined
    assert paired([1.0], [2.0]).diff_verdict == NA  # one seed: no interval
    assert paired([None, 3.0, 4.0], [1.0, None, 2.0]).diff.n == 1  # pairwise drop
    with pytest.raises(ValueError, match="same seeds"):
        paired([1.0, 2.0], [1.0])


def test_judge_ratio():
    p = paired([1.0, 1.2, 0.9, 1.1], [10.0, 11.0, 9.5, 10.5])
    assert judge_ratio(p.ratio, 0.2) == "met"
    assert judge_ratio(p.ratio, 0.05) == "missed"
    assert judge_ratio(paired([1.0, 1.5, 0.7], [1.1, 1.2, 1.0]).ratio, 1.0) == "inside the noise"


# ============================================================================ config
def test_load_settings_and_overrides(tmp_path):
    s = tiny_settings(tmp_path, seeds=[3])
    assert s.seeds == (3,) and s.policies == ("mvp", "sllm")
    assert s.overrides("tiny_short_keep", "sllm", 3) == [
        "cluster=small", "workload.window=[0,60]", "policy.autoscaling.keep_alive_s=10", "workload.window=[0,240]",
        "policy=sllm", "seed=3"]
    with pytest.raises(ConfigError, match="unknown"):
        tiny_settings(tmp_path, scenarios=["nope"])
    with pytest.raises(ConfigError, match="conf/policy"):
        tiny_settings(tmp_path, policies=["no_such_policy"])


def test_null_scenario_means_the_scenario_group(tmp_path):
    (tmp_path / "scenario").mkdir()
    (tmp_path / "scenario" / "here.yaml").write_text("{}\n")
    assert compare.scenario_overrides("here", None, tmp_path) == ("scenario=here",)
    with pytest.raises(ConfigError, match="does not exist"):
        compare.scenario_overrides("missing", None, tmp_path)
    assert compare.scenario_overrides("x", ["a=1", "b=2"], tmp_path) == ("a=1", "b=2")


# ============================================================================ runs and report
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    s = tiny_settings(tmp_path_factory.mktemp("cmp"))
    return s, compare.run_all(s, progress=False)


def test_runs_are_deterministic_in_order_and_across_processes(tiny_runs, tmp_path):
    s, runs = tiny_runs
    assert [(r.scenario, r.policy, r.seed) for r in runs] == [
        (sc, p, k) for sc in ("tiny", "tiny_short_keep") for p in ("mvp", "sllm") for k in (0, 1)]
    again = compare.run_all(compare.Settings(**{**s.__dict__, "workers": 2, "scenarios": {"tiny": ()}}),
                            progress=False)
    assert [(r.metrics, r.cold) for r in again] == [(r.metrics, r.cold) for r in runs if r.scenario == "tiny"]
    for r in runs:
        assert r.metrics["cold_starts"] > 0 and r.metrics["cost_usd"] > 0
        assert sum(r.metrics[f"cold_{t}"] for t in ("gpu", "dram", "nvme", "sata", "cloud")
                   if f"cold_{t}" in r.metrics) <= r.metrics["cold_starts"]


def test_report_structure(tiny_runs, tmp_path):
    s, runs = tiny_runs
    doc = compare_report.write_report(s, runs, tmp_path, command="python -m experiments.compare --x", wall_s=12.3)
    text = doc.read_text()
    assert text.startswith("# Policies compared\n")
    assert "Generated by `python -m experiments.compare --x` in 12 s wall (8 simulations" in text
    assert [m.group(1) for m in re.finditer(r"^## Scenario `(\w+)`$", text, re.M)] == ["tiny", "tiny_short_keep"]
    assert "## Reading the tables\n\n- a *note* on mechanisms\n" in text
    # every table row has as many cells as its header
    for block in re.findall(r"((?:^\|.*\|\n)+)", text, re.M):
        rows = block.strip().splitlines()
        widths = {row.count("|") for row in rows}
        assert len(widths) == 1, block
        assert re.fullmatch(r"\|(---\|)+", rows[1])
    assert text.count("| `sllm` | `mvp` |") == 2  # one paired row per scenario
    assert "Targets" in text and "| <= 0.2 |" in text
    for scen in ("tiny", "tiny_short_keep"):
        assert (tmp_path / "policies" / f"cold_start_cdf_{scen}.png").stat().st_size > 0
        assert f"](policies/cost_ttft_{scen}.png)" in text
    stored = json.loads((tmp_path / "policies" / "runs.json").read_text())
    assert len(stored["runs"]) == 8 and stored["seeds"] == [0, 1]
    line = compare_report.one_line(s, runs, doc, 12.3)
    assert line.startswith("compare: 2 policies x 2 scenarios x 2 seeds = 8 runs in 12 s")


def test_main_writes_the_report(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY)
    compare.main(["--config", str(cfg), "--out", str(tmp_path), "--scenario", "tiny", "--seeds", "0",
                  "--policies", "mvp", "--no-progress"])
    out = capsys.readouterr().out
    assert "1 policies x 1 scenario x 1 seeds = 1 runs" in out
    assert "--scenario tiny" in (tmp_path / "policies.md").read_text()


def test_cold_start_sources_add_up_to_the_mean_and_bound_the_ratio(tiny_runs):
    s, runs = tiny_runs
    for scen in s.scenarios:
        rows = compare_report.cold_start_sources(s, runs, scen)
        for p in s.policies:
            mine = [r for r in rows if r["policy"] == p]
            seeds = [r for r in runs if r.scenario == scen and r.policy == p]
            mean = sum(r.metrics["cold_mean_s"] for r in seeds) / len(seeds)
            assert sum(r["contribution_s"] for r in mine) == pytest.approx(mean, rel=1e-9)
            assert sum(r["share"] for r in mine) == pytest.approx(1.0)
            for r in mine:  # every cold start from the cloud store fetched something
                assert r["fetch_s"] > 0 if r["tier"] == "cloud" else True
        # a policy with only cloud cold starts sits on its floor; the floor never exceeds the ratio itself
        mvp_tiers = {r["tier"] for r in rows if r["policy"] == "mvp"}
        assert mvp_tiers == {"cloud"}
        assert compare_report.cloud_floor(runs, scen, "mvp", "mvp") == pytest.approx(1.0)
        ratio = (sum(r.metrics["cold_mean_s"] for r in runs if r.scenario == scen and r.policy == "sllm")
                 / sum(r.metrics["cold_mean_s"] for r in runs if r.scenario == scen and r.policy == "mvp"))
        assert compare_report.cloud_floor(runs, scen, "sllm", "mvp") <= ratio + 1e-12
    # the short keep-alive makes sllm reload from a local tier, so its floor is strictly below its ratio
    local = [r for r in compare_report.cold_start_sources(s, runs, "tiny_short_keep")
             if r["policy"] == "sllm" and r["tier"] != "cloud"]
    assert local and all(r["share"] > 0 for r in local)
