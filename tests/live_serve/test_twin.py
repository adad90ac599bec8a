"""`python -m experiments.twin`: the join and fidelity metrics on hand-made frames (a request missing on each
side, one lost live, one decision diverging), one small real twin (calibrate, serve + replay, simulate, join)
that writes twin.parquet, fidelity.json and twin.png with every key, and the "cannot serve in time" error."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from core.errors import ConfigError
from core.records import REQUEST_SCHEMA, frame
from core.workload.trace import Workload
from experiments.twin import TwinLimits, one_line
from experiments.twin_join import METRICS, PHASES, compare_runs, error_stats, fidelity, join, node_index, run_counts
from tests.live_serve.serving import checkpoint_cache, env, processes

TIMEOUT_S = 240
ERR_KEYS = {"median_abs_err", "p90_abs_err", "bias"}


def _records(rows: list[dict[str, Any]]) -> pd.DataFrame:
    base = {"tenant": "t", "model": "m", "arrival_s": 0.0, "queue_s": 0.0, "cold_start": False, "source_tier": "gpu",
            "fetch_s": math.nan, "to_gpu_s": math.nan, "engine_init_s": math.nan, "cold_start_s": math.nan,
            "prefill_s": math.nan, "ttft_s": math.nan, "tpot_s": math.nan, "e2e_s": math.nan, "prompt_tokens": 4,
            "output_tokens": 2, "node": "", "instance": "", "outcome": "completed", "reason": "",
            "cost_usd": 0.0, "cache": "", "cached_tokens": 0, "variant": "", "client_region": "", "network_s": math.nan}
    full = [{**base, **r} for r in rows]
    return frame(REQUEST_SCHEMA, {c: [r[c] for r in full] for c in REQUEST_SCHEMA})


LIVE = _records([
    {"request_id": 0, "cold_start": True, "source_tier": "cloud", "node": "n0", "cold_start_s": 2.0, "fetch_s": 1.0,
     "ttft_s": 2.5, "tpot_s": 0.01, "e2e_s": 3.0},
    {"request_id": 1, "node": "n0", "ttft_s": 0.1, "tpot_s": 0.02, "e2e_s": 0.5},
    {"request_id": 2, "node": "n1", "ttft_s": 0.2, "e2e_s": 0.4},
    {"request_id": 3, "node": "n1", "outcome": "failed", "reason": "engine_died"},
])
SIM = _records([
    {"request_id": 0, "cold_start": True, "source_tier": "cloud", "node": "calibrated-0", "cold_start_s": 2.5,
     "fetch_s": 0.8, "ttft_s": 3.0, "tpot_s": 0.01, "e2e_s": 3.5},
    {"request_id": 1, "node": "calibrated-0", "ttft_s": 0.05, "tpot_s": 0.01, "e2e_s": 0.25},
    {"request_id": 2, "cold_start": True, "source_tier": "nvme", "node": "calibrated-1", "cold_start_s": 0.1,
     "ttft_s": 0.3, "tpot_s": 0.01, "e2e_s": 0.6},
    {"request_id": 4, "node": "calibrated-0", "ttft_s": 0.1, "e2e_s": 0.2},
])


def _expected(live: list[float], sim: list[float]) -> dict[str, float]:
    e = (np.array(sim) - np.array(live)) / np.array(live)
    return {"median_abs_err": float(np.median(np.abs(e))), "p90_abs_err": float(np.quantile(np.abs(e), 0.9)),
            "bias": float(np.median(e))}


def test_join_keeps_missing_requests_and_fidelity_follows_the_definitions() -> None:
    j = join(LIVE, SIM)
    assert list(j["request_id"]) == [0, 1, 2, 3, 4]  # outer: nothing dropped
    assert list(j["in_live"]) == [True, True, True, True, False]
    assert list(j["in_sim"]) == [True, True, True, False, True]
    assert j.loc[0, "ttft_s_rel_err"] == pytest.approx((3.0 - 2.5) / 2.5)

    fid = fidelity(LIVE, SIM, extra={"policy": "p", "workload": "w", "seed": 3})
    r = fid["requests"]
    assert (r["live"], r["sim"], r["joined"]) == (4, 4, 3)
    assert r["missing_sim"] == [3] and r["missing_live"] == [4]
    assert r["lost_live"] == {"3": "engine_died"} and r["lost_sim"] == {}
    assert r["live_without_gateway_row"] == []
    for key, value in _expected([2.5, 0.1, 0.2], [3.0, 0.05, 0.3]).items():
        assert fid["ttft_s"][key] == pytest.approx(value)
    for key, value in _expected([3.0, 0.5, 0.4], [3.5, 0.25, 0.6]).items():
        assert fid["e2e_s"][key] == pytest.approx(value)
    for key, value in _expected([0.01, 0.02], [0.01, 0.01]).items():  # request 2 has no live TPOT
        assert fid["tpot_s"][key] == pytest.approx(value)
    assert fid["cold_start_s"]["median_abs_err"] == pytest.approx(0.25) and fid["cold_start_s"]["n"] == 1
    assert fid["phases"]["fetch_s"]["bias"] == pytest.approx(-0.2)
    assert set(fid["phases"]) == set(PHASES)
    assert fid["cold_starts_by_tier"] == {"live": {"cloud": 1}, "sim": {"cloud": 1, "nvme": 1}}
    assert fid["decision_agreement"] == pytest.approx(2 / 3)  # request 2: warm on n1 live, cold from nvme in sim
    first = fid["first_divergence"]
    assert first["request_id"] == 2 and first["live"]["cold_start"] is False and first["sim"]["source_tier"] == "nvme"
    assert (fid["policy"], fid["workload"], fid["seed"]) == ("p", "w", 3)
    assert "LIVE LOST 2" in one_line(fid)  # one failed live, one never seen live
    json.dumps(fid)  # JSON-able as is


def test_error_stats_and_node_ordinals() -> None:
    assert error_stats([math.nan]) == {"median_abs_err": None, "p90_abs_err": None, "bias": None, "n": 0}
    assert error_stats([0.1, -0.3])["bias"] == pytest.approx(-0.1)
    assert node_index("n1") == node_index("calibrated-1") == 1 and node_index("") is None


def test_a_slice_longer_or_faster_than_the_live_stack_serves_is_an_error() -> None:
    wl = Workload.from_columns(np.linspace(0, 200, 11), [4] * 11, [2] * 11)
    with pytest.raises(ConfigError, match=r"twin\.max_live_s.*200\.0 s"):
        TwinLimits(max_live_s=120).check(wl)
    fast = Workload.from_columns(np.linspace(0, 10, 101), [4] * 101, [2] * 101)
    with pytest.raises(ConfigError, match=r"twin\.max_rate_per_s"):
        TwinLimits(max_rate_per_s=4).check(fast)
    TwinLimits().check(Workload.from_columns(np.linspace(0, 20, 10), [4] * 10, [2] * 10))


# --------------------------------------------------------------------------- end to end

pytest_e2e = pytest.mark.skipif(any(__import__("importlib").util.find_spec(d) is None
                                    for d in ("torch", "safetensors", "tokenizers", "uvicorn")),
                                reason="the live stack's dependencies are not installed")
BASE = ["~catalog.small-a", "nodes=2", "progress=false", "tiers.nvme.read_MBps=20", "tiers.nvme.write_MBps=15",
        "tiers.sata.read_MBps=10", "tiers.sata.write_MBps=8", "cloud.streams=2", "cloud.stream_MBps=5",
        "probe.repeats=1", "probe.prefill_lengths=[16,64]", "probe.decode_batches=[1,2]", "probe.decode_tokens=8",
        "workload=poisson", "workload.options.rate_per_s=0.5", "workload.window=[0,20]", "workload.max_requests=10"]


def _twin(tmp: Path, *overrides: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp / "run"
    argv = [sys.executable, "-m", "experiments.twin", f"hydra.run.dir={out}", f"checkpoint_cache={checkpoint_cache()}",
            *BASE, *overrides]
    return subprocess.run(argv, capture_output=True, text=True, env=env(), cwd=tmp, timeout=TIMEOUT_S), out


@pytest_e2e
def test_a_small_twin_writes_the_join_the_fidelity_and_the_figure(tmp_path: Path) -> None:
    proc, out = _twin(tmp_path, "policy=seed_tiered", "seed=0")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    assert proc.stdout.splitlines()[-1].startswith("twin (seed_tiered, poisson, seed 0)")
    fid = json.loads((out / "fidelity.json").read_text())
    n = fid["requests"]["live"]
    assert n == fid["requests"]["sim"] == fid["requests"]["joined"] >= 5, fid["requests"]
    assert fid["requests"]["lost_live"] == {} and fid["requests"]["missing_live"] == []
    assert fid["requests"]["live_without_gateway_row"] == []
    for m in METRICS:
        assert set(fid[m]) >= ERR_KEYS, m
    for m in ("ttft_s", "e2e_s"):
        assert all(math.isfinite(fid[m][k]) for k in ERR_KEYS), fid[m]
    assert fid["phases"] and all(set(v) >= ERR_KEYS for v in fid["phases"].values())
    assert set(fid["cold_starts_by_tier"]) == {"live", "sim"}
    run = fid["run"]  # instances started and tier moves, each side, from its own tables
    assert run["instances_started"]["live"] >= 1 and run["instances_started"]["sim"] >= 1
    assert set(run) == {"instances_started", "tier_copies", "evictions"}
    assert all(set(v) == {"live", "sim", "rel_err"} for v in run.values())
    assert sum(fid["cold_starts_by_tier"]["live"].values()) >= 1
    assert 0.0 <= fid["decision_agreement"] <= 1.0
    assert (fid["policy"], fid["workload"], fid["seed"]) == ("seed_tiered", "poisson", 0)
    assert fid["scaling"]["max_output_tokens"] == 8
    j = pd.read_parquet(out / "twin.parquet")
    assert len(j) == n and (j["model_live"] == j["model_sim"]).all()
    assert np.allclose(j["arrival_s_live"], j["arrival_s_sim"])
    assert (j["output_tokens_live"] == j["output_tokens_sim"]).all()
    assert (out / "twin.png").stat().st_size > 10_000
    assert not [p.cmdline for p in processes() if str(tmp_path) in p.cmdline], "processes left running"
    dram_root = json.loads((out / "live" / "serve" / "serve.json").read_text())["dram_root"]
    assert not Path(dram_root).exists(), "the live run's dram tier was left in /dev/shm"

    # reuse_live=RUN: the same live half, only the simulated half again (after a simulator change: no live run)
    again_dir = tmp_path / "again"
    again_dir.mkdir()
    calib = out / "calibrate" / "calibrated.yaml"
    proc2, out2 = _twin(again_dir, "policy=seed_tiered", "seed=0", f"reuse_live={out}", f"calibration={calib}")
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert not (out2 / "live" / "serve").exists()  # nothing served
    pd.testing.assert_frame_equal(pd.read_parquet(out2 / "live" / "records.parquet"),
                                  pd.read_parquet(out / "live" / "records.parquet"))
    fid2 = json.loads((out2 / "fidelity.json").read_text())
    assert fid2["requests"] == fid["requests"] and fid2["live_wall_s"] == fid["live_wall_s"]
    assert fid2["ttft_s"] == fid["ttft_s"]  # same calibration, same code: the same simulated half
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    proc3, _ = _twin(other_dir, "policy=seed_tiered", "seed=1", f"reuse_live={out}", f"calibration={calib}")
    assert proc3.returncode == 2 and "reuse_live" in proc3.stderr and "another slice" in proc3.stderr, proc3.stderr


@pytest_e2e
def test_a_slice_the_live_stack_cannot_serve_in_time_fails_before_starting(tmp_path: Path) -> None:
    proc, out = _twin(tmp_path, "workload.window=[0,600]", "workload.options.duration_s=600",
                        "workload.max_requests=null", "twin.max_live_s=60")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "twin.max_live_s" in proc.stderr and "60 s" in proc.stderr, proc.stderr
    assert not (out / "calibrate").exists() and not (out / "live").exists()


def test_sub_floor_queues_have_no_relative_error_and_undecided_losses_are_not_disagreements() -> None:
    live = _records([
        {"request_id": 0, "node": "n0", "queue_s": 0.0002, "ttft_s": 0.1, "e2e_s": 0.2},   # policy compute time
        {"request_id": 1, "node": "n0", "queue_s": 0.5, "ttft_s": 0.6, "e2e_s": 0.7},      # a real wait
        {"request_id": 2, "node": "", "outcome": "failed", "reason": "client_timeout"},    # lost before placement
    ])
    sim = _records([
        {"request_id": 0, "node": "calibrated-0", "queue_s": 0.0, "ttft_s": 0.1, "e2e_s": 0.2},
        {"request_id": 1, "node": "calibrated-0", "queue_s": 0.4, "ttft_s": 0.5, "e2e_s": 0.6},
        {"request_id": 2, "cold_start": True, "source_tier": "cloud", "node": "calibrated-1", "ttft_s": 2.0,
         "e2e_s": 2.1},
    ])
    j = join(live, sim)
    assert math.isnan(j.loc[0, "queue_s_rel_err"])  # both below REL_ERR_FLOOR_S: undefined, not -100%
    assert j.loc[0, "queue_s_abs_err_s"] == pytest.approx(0.0002)
    assert j.loc[1, "queue_s_rel_err"] == pytest.approx(-0.2)
    fid = fidelity(live, sim)
    q = fid["phases"]["queue_s"]
    assert q["n"] == 1 and q["median_abs_err"] == pytest.approx(0.2)
    assert q["abs_err_s"]["n"] == 2 and q["abs_err_s"]["median"] == pytest.approx((0.0002 + 0.1) / 2)
    # request 2: the live client gave up before the gateway answered, so its live decision is unknown
    assert fid["requests"]["lost_live_undecided"] == [2] and fid["requests"]["decided"] == 2
    assert fid["decision_agreement"] == 1.0


def test_run_counts_compare_instances_started_and_tier_moves() -> None:
    inst = pd.DataFrame({"event": ["loading", "ready", "loading", "stopped", "loading"]})
    sim_moves = pd.DataFrame({"kind": ["cache", "demote", "evict", "initial"]})
    live_moves = pd.DataFrame({"kind": ["copy", "copy"]})
    actions = pd.DataFrame({"kind": ["evict", "evict", "copy"], "outcome": ["done", "failed", "done"]})
    live = run_counts(inst, live_moves, actions)
    assert live == {"instances_started": 3, "tier_copies": 2, "evictions": 1}
    sim = run_counts(inst.iloc[:2], sim_moves)
    assert sim == {"instances_started": 1, "tier_copies": 2, "evictions": 1}
    c = compare_runs(live, sim)
    assert c["instances_started"] == {"live": 3, "sim": 1, "rel_err": pytest.approx(-2 / 3)}
    assert c["tier_copies"]["rel_err"] == 0.0
    assert compare_runs(run_counts(None, None), sim)["instances_started"]["rel_err"] is None
