"""A real twin whose live run loses requests: the replay client gives up after `replay.request_timeout_s=1`, so
every request that waits for a cold start (an engine start alone takes over a second on CPU) times out live, while
the simulator serves it. fidelity.json must list them as lost with their reason, twin.parquet must keep their rows,
and no error statistic may compare them (a timed-out request's e2e is when the client gave up, not a latency)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.twin_join import METRICS, PHASES, error_stats
from experiments.twin_seeds import summarize
from tests.live_serve.serving import checkpoint_cache, env, processes
from tests.live_serve.test_twin import BASE, pytest_e2e

TIMEOUT_S = 240
#: a short slice: 8 requests in ~5 s over two models, the first of each model (and those queued behind it) cold
LOSSY = ["workload.options.rate_per_s=1.0", "workload.window=[0,10]", "workload.max_requests=8",
         "replay.request_timeout_s=1.0", "policy=seed_tiered", "seed=0"]


@pytest_e2e
def test_a_twin_whose_live_run_times_out_reports_the_lost_requests(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "experiments.twin", f"hydra.run.dir={out}", f"checkpoint_cache={checkpoint_cache()}",
            *BASE, *LOSSY]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    assert "LIVE LOST" in proc.stdout.splitlines()[-1], proc.stdout[-1000:]

    fid = json.loads((out / "fidelity.json").read_text())
    r = fid["requests"]
    lost = {int(k): v for k, v in r["lost_live"].items()}
    assert lost, r
    assert set(lost.values()) == {"client_timeout"}, lost
    assert len(lost) < r["live"], "nothing completed live: the timeout is too short to test the exclusion"
    assert r["lost_sim"] == {} and r["missing_live"] == [] and r["missing_sim"] == []
    assert r["live"] == r["sim"] == r["joined"]  # lost, not missing: every request has its row on both sides

    j = pd.read_parquet(out / "twin.parquet")
    rows = j[j["request_id"].isin(list(lost))]
    assert sorted(rows["request_id"]) == sorted(lost)
    assert rows["in_live"].all() and rows["in_sim"].all()
    assert (rows["outcome_live"] != "completed").all() and (rows["reason_live"] == "client_timeout").all()
    assert (rows["outcome_sim"] == "completed").all()
    assert rows["e2e_s_live"].notna().all()  # the client did measure something: the time until it gave up
    for col in [f"{m}_rel_err" for m in (*METRICS, *PHASES) if f"{m}_rel_err" in j]:
        assert rows[col].isna().all(), col

    # every statistic is over the requests completed on both sides, and only those
    done = j[(j["outcome_live"] == "completed") & (j["outcome_sim"] == "completed")]
    assert len(done) == r["joined"] - len(lost)
    for m in ("ttft_s", "e2e_s"):
        lv, sv = done[f"{m}_live"].to_numpy(float), done[f"{m}_sim"].to_numpy(float)
        expected = error_stats((sv - lv) / lv)
        assert fid[m]["n"] == len(done) and expected["n"] == len(done), (m, fid[m])
        for k in ("median_abs_err", "p90_abs_err", "bias"):
            assert math.isclose(fid[m][k], expected[k]), (m, k)
    assert fid["cold_start_s"]["n"] <= len(done)

    # the report's pooling counts them and compares the same requests
    g = summarize([(fid, j)])
    assert g["requests"]["lost_live"] == len(lost)
    assert g["metrics"]["e2e_s"]["median_abs_err"]["n"] == len(done)
    assert g["percentiles"]["ttft_s"]["p90"]["rel_err"]["n"] == len(done)
    assert np.isclose(g["metrics"]["e2e_s"]["median_abs_err"]["value"], fid["e2e_s"]["median_abs_err"])

    assert not [p.cmdline for p in processes() if str(tmp_path) in p.cmdline], "processes left running"
