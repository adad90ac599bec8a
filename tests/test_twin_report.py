"""`experiments.twin_report`: docs/fidelity.md from hand-made fidelity dicts; the tables show the values and the
met / not-met verdicts follow the targets; per-run percentiles from a hand-made join."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest

from experiments.twin_report import misses, pct, render, run_percentiles, verdict


def _stat(med: float | None, p90: float | None, bias: float | None, n: int) -> dict[str, Any]:
    return {"median_abs_err": med, "p90_abs_err": p90, "bias": bias, "n": n}


def _fid(policy: str, workload: str, *, cold: tuple[float, float], agree: float, tiers: dict[str, Any],
         ttft_p50_err: float, tpot_p50_err: float, fetch_med: float) -> dict[str, Any]:
    return {
        "policy": policy, "workload": workload, "report_workload": workload, "seed": 0, "live_wall_s": 21.5,
        "requests": {"live": 10, "sim": 10, "joined": 10, "lost_live": {}, "missing_live": []},
        "cold_start_s": _stat(cold[0], cold[1], -0.02, 4),
        "ttft_s": _stat(0.12, 0.3, 0.05, 10), "tpot_s": _stat(0.5, 0.9, -0.4, 10), "e2e_s": _stat(0.08, 0.2, 0.01, 10),
        "phases": {"fetch_s": _stat(fetch_med, 0.3, -fetch_med, 4), "engine_init_s": _stat(0.04, 0.06, 0.04, 4),
                   "to_gpu_s": _stat(None, None, None, 0)},
        "cold_starts_by_tier": tiers,
        "decision_agreement": agree,
        "first_divergence": {"request_id": 7, "model": "tiny-b",
                             "live": {"cold_start": True, "node": "n0", "source_tier": "nvme"},
                             "sim": {"cold_start": True, "node": "calibrated-1", "source_tier": "cloud"}},
        "percentiles": {"ttft_s": {"p50": {"live": 0.1, "sim": 0.1 * (1 + ttft_p50_err), "rel_err": ttft_p50_err},
                                   "p90": {"live": 2.0, "sim": 2.1, "rel_err": 0.05}},
                        "tpot_s": {"p50": {"live": 0.004, "sim": 0.004 * (1 + tpot_p50_err),
                                           "rel_err": tpot_p50_err}}},
    }


GOOD = _fid("mvp", "steady", cold=(0.05, 0.15), agree=0.95, tiers={"live": {"cloud": 4}, "sim": {"cloud": 4}},
            ttft_p50_err=0.10, tpot_p50_err=-0.05, fetch_med=0.03)
BAD = _fid("sllm", "steady", cold=(0.25, 0.60), agree=0.70,
           tiers={"live": {"cloud": 10, "nvme": 2}, "sim": {"cloud": 10, "sata": 1}},
           ttft_p50_err=-0.30, tpot_p50_err=0.55, fetch_med=0.40)
META = {"command": "python -m experiments.twin --report", "date": "2026-12-02 14:00 UTC", "machine": "2 cores",
        "steady": "steady", "workloads": {"steady": "poisson 0.5/s"}, "calibration": {"engine": "start 1.39 s"},
        "figure": "fidelity/twin.png"}


def _row(md: str, *cells: str) -> str:
    """The one table row that starts with `cells`."""
    rows = [ln for ln in md.splitlines() if ln.startswith("| " + " | ".join(cells) + " |")]
    assert len(rows) == 1, (cells, rows)
    return rows[0]


def test_verdicts_follow_the_targets() -> None:
    assert verdict(0.10, 0.10) == "yes" and verdict(0.11, 0.10) == "**no**" and verdict(None, 0.1) == "n/a"
    assert verdict(0.9, 0.9, at_least=True) == "yes" and verdict(0.89, 0.9, at_least=True) == "**no**"
    assert pct(0.1234) == "12.3%" and pct(math.nan) == "n/a"


def test_tables_show_the_values_and_the_verdicts() -> None:
    md = render([GOOD, BAD], META)
    # cold start: n, median, p90, bias, verdicts of both targets
    assert _row(md, "mvp", "steady", "4", "5.0%", "15.0%", "-2.0%").endswith("| yes / yes |")
    assert _row(md, "sllm", "steady", "4", "25.0%", "60.0%", "-2.0%").endswith("| **no** / **no** |")
    # per-run percentiles: TTFT p50 within 15%, TPOT p50 within 10%
    assert _row(md, "mvp", "steady", "TTFT p50").endswith("| +10.0% | <= 15.0% | yes |")
    assert _row(md, "sllm", "steady", "TTFT p50").endswith("| -30.0% | <= 15.0% | **no** |")
    assert _row(md, "sllm", "steady", "TPOT p50").endswith("| +55.0% | <= 10.0% | **no** |")
    assert _row(md, "mvp", "steady", "TPOT p50").endswith("| yes |")
    # phases: fetch 40% misses, engine_init 4% is fine, a phase with no samples is not judged
    assert _row(md, "mvp", "steady", "4.0% (n=4)", "3.0% (n=4)").endswith("| yes |")
    assert "to_gpu_s" not in md.split("### Phases")[1].split("###")[0]
    assert _row(md, "sllm", "steady", "4.0% (n=4)", "40.0% (n=4)").endswith("| **no** (1 of 2) |")
    # tiers: equal counts met, a tier live has and sim lacks (or the reverse) not met
    assert _row(md, "mvp", "steady", "cloud", "4", "4").endswith("| 0.0% | yes |")
    assert _row(md, "sllm", "steady", "nvme", "2", "0").endswith("| 100.0% | **no** |")
    assert _row(md, "sllm", "steady", "sata", "0", "1").endswith("| **no** (live 0) |")
    # agreement on the steady workload
    # one cell for the divergence: its "live | sim" pipe is escaped, so the row keeps the header's 6 columns
    assert ("| mvp | steady | 95.0% | >= 90% | yes | #7 tiny-b: cold=True, node=n0, tier=nvme \\| cold=True, "
            "node=calibrated-1, tier=cloud |") in md
    assert _row(md, "sllm", "steady", "70.0%").startswith("| sllm | steady | 70.0% | >= 90% | **no** |")
    assert "![twin](fidelity/twin.png)" in md and "python -m experiments.twin --report" in md


def test_the_discussion_lists_every_miss_and_only_misses() -> None:
    found = misses([GOOD, BAD], "steady")
    assert not [m for m in found if "mvp" in m]
    text = "\n".join(found)
    for piece in ("cold-start median |err| <= 10% missed: 25.0%", "cold-start p90 |err| <= 20% missed: 60.0%",
                  "fetch_s 40.0%", "run TTFT p50 within 15% missed", "run TPOT p50 within 10% missed",
                  "cold starts by tier differ", "decision agreement 70.0% < 90%"):
        assert piece in text, piece
    assert "Every target is met." in render([GOOD], META)
    # agreement is only judged on the steady workload
    assert not [m for m in misses([{**BAD, "report_workload": "bursty"}], "steady") if "agreement" in m]


def test_run_percentiles_from_a_join() -> None:
    j = pd.DataFrame({"in_live": [True] * 4 + [False], "in_sim": [True] * 5,
                      "ttft_s_live": [0.1, 0.2, 0.3, 0.4, np.nan], "ttft_s_sim": [0.2, 0.2, 0.2, 0.2, 9.0],
                      "tpot_s_live": [0.01] * 4 + [np.nan], "tpot_s_sim": [0.02] * 5})
    p = run_percentiles(j)
    assert p["ttft_s"]["p50"]["live"] == pytest.approx(0.25)
    assert p["ttft_s"]["p90"]["sim"] == pytest.approx(np.quantile([0.2] * 4 + [9.0], 0.9))
    assert p["tpot_s"]["p50"]["rel_err"] == pytest.approx(1.0)
