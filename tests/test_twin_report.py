"""The twin report across seeds: `experiments.twin_seeds` pools each metric over seeds with a deterministic
bootstrap interval and judges it met / missed / inside the noise; `experiments.twin_report.render` shows value,
interval and n per row; `experiments.twin_run_report.report` (report.reuse=true) re-renders from run dirs laid
out as runs_dir/<workload>/<policy>/seed<k>, made here from hand-made records through the real join."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from core.records import REQUEST_SCHEMA, frame
from experiments.twin_join import fidelity, join
from experiments.twin_report import interval, misses, pct, render, run_percentiles
from experiments.twin_run_report import report, run_dir
from experiments.twin_seeds import MET, MISSED, NA, NOISE, estimate, judge, summarize

# --------------------------------------------------------------------------- hand-made runs


def _records(rows: list[dict[str, Any]]) -> pd.DataFrame:
    base = {"tenant": "t", "model": "tiny-a", "arrival_s": 0.0, "queue_s": 0.0, "cold_start": False,
            "source_tier": "gpu", "fetch_s": math.nan, "to_gpu_s": math.nan, "engine_init_s": math.nan,
            "cold_start_s": math.nan, "prefill_s": math.nan, "ttft_s": math.nan, "tpot_s": math.nan,
            "e2e_s": math.nan, "prompt_tokens": 4, "output_tokens": 2, "node": "n0", "instance": "",
            "outcome": "completed", "reason": "", "cost_usd": 0.0,
            "cache": "", "cached_tokens": 0, "variant": "", "client_region": "", "network_s": math.nan}
    full = [{**base, **r} for r in rows]
    return frame(REQUEST_SCHEMA, {c: [r[c] for r in full] for c in REQUEST_SCHEMA})


def _run(seed: int, cold_err: float, ttft_err: float, n: int = 12, lost: int = 0,
         spread: float = 0.0) -> tuple[pd.DataFrame, ...]:
    """Live and sim records of one seed: every 2nd request a cloud cold start whose sim latency is off by
    `cold_err` (+ / - `spread` alternately; the sign alternates too), every TTFT off by `ttft_err`; the last
    `lost` requests time out live."""
    live, sim = [], []
    for i in range(n):
        cold = i % 2 == 0
        c_live = 2.0 + 0.1 * i + 0.01 * seed
        sign = 1 if i % 4 == 0 else -1
        row = {"request_id": i, "arrival_s": float(i), "cold_start": cold, "source_tier": "cloud" if cold else "gpu",
               "node": f"n{i % 2}"}
        lv = {**row, "cold_start_s": c_live if cold else math.nan, "fetch_s": 1.0 if cold else math.nan,
              "ttft_s": (c_live if cold else 0.1) + 0.05, "tpot_s": 0.004, "e2e_s": 3.0}
        sv = {**row, "node": f"calibrated-{i % 2}",
              "cold_start_s": c_live * (1 + sign * (cold_err + (spread if i % 4 == 0 else -spread)))
              if cold else math.nan,
              "fetch_s": 1.0 if cold else math.nan, "ttft_s": lv["ttft_s"] * (1 + ttft_err), "tpot_s": 0.004,
              "e2e_s": 3.0}
        if i >= n - lost:
            lv = {**lv, "outcome": "failed", "reason": "client_timeout", "ttft_s": math.nan, "e2e_s": 1.0}
        live.append(lv)
        sim.append(sv)
    return _records(live), _records(sim)


def _fid(seed: int, workload: str, policy: str, **kw: Any) -> tuple[dict[str, Any], pd.DataFrame]:
    live, sim = _run(seed, **kw)
    j = join(live, sim)
    f = fidelity(live, sim, j, extra={"policy": policy, "workload": workload, "seed": seed, "live_wall_s": 12.0})
    return json.loads(json.dumps(f)), j  # as read back from fidelity.json


def _row(md: str, *cells: str) -> str:
    """The one table row that starts with `cells`."""
    rows = [ln for ln in md.splitlines() if ln.startswith("| " + " | ".join(cells) + " |")]
    assert len(rows) == 1, (cells, rows)
    return rows[0]


META = {"command": "python -m experiments.twin --report", "date": "2026-12-02 14:00 UTC", "machine": "2 cores",
        "steady": "steady", "workloads": {"steady": "poisson 0.5/s"}, "calibration": {"engine": "start 1.39 s"},
        "figure": "fidelity/twin.png", "discussion": ["Hand-written text."]}

# --------------------------------------------------------------------------- estimates and verdicts


def test_verdicts_compare_the_interval_with_the_limit() -> None:
    est = lambda v, lo, hi, n=20: {"value": v, "lo": lo, "hi": hi, "n": n}  # noqa: E731
    assert judge(est(0.05, 0.02, 0.08), 0.10) == MET
    assert judge(est(0.05, 0.02, 0.10), 0.10) == MET  # the limit itself is allowed
    assert judge(est(0.30, 0.12, 0.50), 0.10) == MISSED
    assert judge(est(0.09, 0.04, 0.15), 0.10) == NOISE  # value under the limit, interval straddles it
    assert judge(est(0.05, 0.02, 0.08, n=3), 0.10, min_n=5) == NOISE  # too few to tell
    assert judge(est(-0.05, -0.12, 0.02), 0.15, two_sided=True) == MET
    assert judge(est(-0.30, -0.40, -0.20), 0.15, two_sided=True) == MISSED
    assert judge(est(-0.10, -0.20, 0.01), 0.15, two_sided=True) == NOISE
    assert judge(est(0.95, 0.91, 1.0), 0.9, at_least=True) == MET
    assert judge(est(0.70, 0.50, 0.85), 0.9, at_least=True) == MISSED
    assert judge(est(0.0, 0.0, math.inf), 0.1) == NOISE and judge(est(math.inf, math.inf, math.inf), 0.1) == MISSED
    assert judge({"value": None}, 0.1) == judge(None, 0.1) == NA
    assert pct(0.1234) == "12.3%" and pct(math.nan) == "n/a" and pct(math.inf) == "inf"


def test_estimates_pool_the_seeds_and_are_deterministic() -> None:
    rng = np.random.default_rng(1)
    seeds = [rng.normal(0.1, 0.05, 15), rng.normal(0.2, 0.05, 25)]
    stat = lambda x: np.median(x[..., 0], axis=-1)  # noqa: E731
    a, b = estimate(seeds, stat), estimate(seeds, stat)
    assert a == b  # a fixed generator: the same runs give the same interval
    assert a["value"] == pytest.approx(np.median(np.concatenate(seeds))) and a["n"] == 40
    assert a["per_seed"] == pytest.approx([np.median(seeds[0]), np.median(seeds[1])])
    assert a["lo"] < a["value"] < a["hi"] and a["hi"] - a["lo"] < 0.1
    constant = estimate([np.full(5, 0.3), np.full(4, 0.3)], stat)
    assert constant["lo"] == constant["hi"] == pytest.approx(0.3)  # nothing to resample: no spread
    empty = estimate([np.array([]), np.array([])], stat)
    assert empty["value"] is None and empty["n"] == 0


# --------------------------------------------------------------------------- pooling real joins


def test_summarize_pools_counts_metrics_and_excludes_lost_requests() -> None:
    runs = [_fid(s, "steady", "mvp", cold_err=0.05, ttft_err=0.02, lost=2 if s == 1 else 0) for s in (0, 1, 2)]
    g = summarize(runs)
    assert g["seeds"] == [0, 1, 2] and (g["policy"], g["workload"]) == ("mvp", "steady")
    assert g["requests"] == {"live": 36, "sim": 36, "joined": 36, "lost_live": 2}
    cs = g["metrics"]["cold_start_s"]["median_abs_err"]
    # 18 cold starts, one of them (seed 1, request 10) lost live: not compared
    assert cs["n"] == 17 and cs["value"] == pytest.approx(0.05) and cs["lo"] == pytest.approx(0.05)
    assert g["metrics"]["cold_start_s"]["bias"]["lo"] < 0 < g["metrics"]["cold_start_s"]["bias"]["hi"]
    # the two requests lost live (seed 1) have no TTFT or e2e error: 36 - 2 requests compared
    assert g["metrics"]["ttft_s"]["median_abs_err"]["n"] == 34 and g["metrics"]["e2e_s"]["median_abs_err"]["n"] == 34
    assert g["metrics"]["ttft_s"]["median_abs_err"]["value"] == pytest.approx(0.02)
    p50 = g["percentiles"]["ttft_s"]["p50"]
    assert p50["rel_err"]["value"] == pytest.approx((p50["sim"] - p50["live"]) / p50["live"])
    assert p50["rel_err"]["n"] == 34  # over the same requests on both sides: the lost ones are left out
    assert g["tiers"]["live"] == g["tiers"]["sim"] == {"cloud": 18}
    assert g["tiers"]["rel_err"]["cloud"]["value"] == 0.0
    assert g["agreement"]["value"] == 1.0 and g["agreement"]["n"] == 36 and g["first_divergence"] == []
    assert summarize(runs) == g


def test_tables_show_value_interval_n_and_the_three_verdicts() -> None:
    good = summarize([_fid(s, "steady", "mvp", cold_err=0.05, ttft_err=0.02) for s in (0, 1, 2)])
    bad = summarize([_fid(s, "steady", "sllm", cold_err=0.40, ttft_err=-0.30) for s in (0, 1, 2)])
    # cold-start errors of 15%, 5%, 15% per seed: the median's interval [5%, 15%] straddles the 10% limit
    noisy = summarize([_fid(s, "bursty", "sllm", cold_err=0.10, ttft_err=0.15, n=6, spread=0.05) for s in (0, 1)])
    md = render([good, bad, noisy], META)
    cs = good["metrics"]["cold_start_s"]
    assert _row(md, "mvp", "steady", "18", interval(cs["median_abs_err"])).endswith("| met | met |")
    assert _row(md, "sllm", "steady", "18", "40.0% [40.0%, 40.0%]").endswith("| **missed** | **missed** |")
    assert _row(md, "sllm", "bursty", "6").endswith("| inside the noise | met |")
    ttft = bad["percentiles"]["ttft_s"]["p50"]["rel_err"]
    assert _row(md, "sllm", "steady", "TTFT p50").endswith(
        f"| {interval(ttft, signed=True)} | -30.0%, -30.0%, -30.0% | 36 | within 15.0% | **missed** |")
    assert _row(md, "mvp", "steady", "TTFT p50").endswith("| met |")
    assert _row(md, "mvp", "steady", "cloud", "18", "18").endswith("| 0.0% [0.0%, 0.0%] | met |")
    assert _row(md, "mvp", "steady", "fetch_s", "18", "0.0% [0.0%, 0.0%]").endswith("| met |")
    assert _row(md, "mvp", "steady", "0, 1, 2", "36", "36", "36", "0")
    glance = md.split("### Verdicts at a glance")[1].split("###")[0]
    assert "| cold-start median \\|err\\| <= 10% | 1 | 1 | 1 | 0 |" in glance
    assert "Hand-written text." in md and "![twin](fidelity/twin.png)" in md and "bootstrap" in md
    missed, noisy_lines = misses([good, bad, noisy], "steady")
    assert not [m for m in missed + noisy_lines if "mvp" in m]
    assert any("sllm / steady**: cold start median: 40.0% [40.0%, 40.0%]" in m for m in missed)
    assert any("sllm / bursty**: cold start median" in m for m in noisy_lines)
    assert not [m for m in missed + noisy_lines if "bursty" in m and "agreement" in m]  # steady only
    assert "Every target missed" in md and "inside the noise (the interval straddles" in md


def test_run_percentiles_from_a_join() -> None:
    j = pd.DataFrame({"in_live": [True] * 4 + [False], "in_sim": [True] * 5,
                      "ttft_s_live": [0.1, 0.2, 0.3, 0.4, np.nan], "ttft_s_sim": [0.2, 0.2, 0.2, 0.2, 9.0],
                      "tpot_s_live": [0.01] * 4 + [np.nan], "tpot_s_sim": [0.02] * 5})
    p = run_percentiles(j)
    assert p["ttft_s"]["p50"]["live"] == pytest.approx(0.25)
    assert p["ttft_s"]["p90"]["sim"] == pytest.approx(np.quantile([0.2] * 4 + [9.0], 0.9))
    assert p["tpot_s"]["p50"]["rel_err"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- the runner, reusing run dirs


def _calibrated(path: Path) -> Path:
    """The keys of a calibrated.yaml that the report summarizes."""
    tier = {"read_bw_Bps": 2e7, "write_bw_Bps": 1.5e7, "capacity_bytes": 25 * 2**20}
    path.write_text(yaml.safe_dump({
        "cluster": {"store": {"per_stream_Bps": 5e6, "streams": 2, "ttfb_s": 0.05},
                    "node_groups": [{"gpu": {"h2d_Bps": 2.3e8}, "tiers": {"nvme": tier}}]},
        "engine": {"process_start_s": 1.3, "request_overhead_s": 0.025, "step_overhead_s": 0.003}}))
    return path


def test_report_reuses_seed_run_dirs_and_renders(tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    for wl in ("steady", "bursty"):
        for s in (0, 1):
            fid, j = _fid(s, wl, "mvp", cold_err=0.05, ttft_err=0.02, lost=1 if (wl, s) == ("bursty", 1) else 0)
            out = run_dir(runs_dir, wl, "mvp", s)
            out.mkdir(parents=True)
            (out / "fidelity.json").write_text(json.dumps(fid))
            j.to_parquet(out / "twin.parquet")
    (tmp_path / "fig").mkdir()
    (tmp_path / "fig" / "discussion.md").write_text("Kept by hand.\n")
    md_path = report([f"calibration={_calibrated(tmp_path / 'calibrated.yaml')}", "report.reuse=true",
                      f"report.runs_dir={runs_dir}", f"report.out={tmp_path / 'fidelity.md'}",
                      f"report.figure_dir={tmp_path / 'fig'}", "report.policies=[mvp]", "report.seeds=[0,1]",
                      "report.figure=[bursty,mvp]"])
    md = md_path.read_text()
    assert _row(md, "mvp", "steady", "0, 1", "24", "24", "24", "0")
    assert _row(md, "mvp", "bursty", "0, 1", "24", "24", "24", "1")
    assert _row(md, "mvp", "bursty", "TTFT p50")
    assert "Kept by hand." in md and "seed<k>" in md and "report.reuse=true" in md
    assert (tmp_path / "fig" / "twin.png").stat().st_size > 10_000


def test_inference_section_reports_each_gpu_source_against_the_target() -> None:
    from experiments.inference_fit import analyse
    from experiments.twin_report import inference_section

    fit = analyse()
    lines = inference_section(fit, "fidelity/inference.md")
    rows = [ln for ln in lines if ln.startswith("| H100") or ln.startswith("| A100")]
    assert len(rows) == 6  # 2 GPUs x (fitted, held out, all-reduce)
    for ln in rows:
        median = float(ln.split("|")[4].strip().rstrip("%")) / 100
        assert (MET in ln) == (median <= 0.10)
    assert "[fidelity/inference.md](fidelity/inference.md)" in "\n".join(lines)
    assert "Not available" in "\n".join(inference_section(None, ""))


def test_run_counts_are_summed_over_seeds_and_tabled() -> None:
    from experiments.twin_report import run_section
    from experiments.twin_seeds import _run_counts

    def run(i: tuple[int, int], c: tuple[int, int], e: tuple[int, int]) -> dict:
        return {"run": {k: {"live": v[0], "sim": v[1]} for k, v in
                        (("instances_started", i), ("tier_copies", c), ("evictions", e))}}

    fids = [run((5, 4), (3, 3), (0, 1)), run((7, 8), (1, 2), (2, 1))]
    r = _run_counts(fids)
    assert r == {"instances_started": {"live": [5, 7], "sim": [4, 8]}, "tier_copies": {"live": [3, 1], "sim": [3, 2]},
                 "evictions": {"live": [0, 2], "sim": [1, 1]}}
    assert _run_counts([{"run": None}, *fids]) is None  # runs from before the counts were recorded
    lines = run_section([{"policy": "p", "workload": "w", "run": r}])
    assert "| p | w | instances started | 12 | 12 | +0.0% | 5/4, 7/8 |" in lines
    assert "| p | w | tier copies | 4 | 5 | +25.0% | 3/3, 1/2 |" in lines
    assert run_section([{"policy": "p", "workload": "w", "run": None}]) == []
