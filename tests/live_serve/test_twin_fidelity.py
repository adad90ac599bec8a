"""The twin's fidelity in CI (experiments.twin_baseline): the baseline comparison on hand-written fidelity dicts
(regressed, within tolerance, improved, a metric missing, a malformed baseline), then one small real twin
(calibrate once, mvp and seed_tiered on a 30 s slice each) compared with tests/live_serve/fidelity_baseline.json,
and the same live runs re-simulated on a deliberately wrong description, which the comparison must fail."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from experiments.twin_baseline import (
    BASELINE_PATH,
    GUARDED,
    POLICIES,
    SHARED_OVERRIDES,
    UPDATE_COMMAND,
    WORKLOAD_OVERRIDES,
    FidelityBaselineError,
    compare,
    guarded_metrics,
    load_baseline,
    parse_baseline,
    resimulate,
    run_small_twin,
)
from tests.live_serve.serving import checkpoint_cache, processes

# --------------------------------------------------------------------------- the comparison, on hand-made dicts


def _fid(cold: float = 0.05, agree: float = 0.8, **over: Any) -> dict[str, Any]:
    fid: dict[str, Any] = {
        "cold_start_s": {"median_abs_err": cold}, "ttft_s": {"median_abs_err": 0.3}, "run_ttft_p50_abs_err": 0.1,
        "phases": {"fetch_s": {"median_abs_err": 0.01}, "engine_init_s": {"median_abs_err": 0.1}},
        "decision_agreement": agree, "cold_starts_by_tier": {"live": {"cloud": 8, "nvme": 2}, "sim": {"cloud": 9}}}
    fid.update(over)
    return fid


BASE = parse_baseline({"policies": {"mvp": {
    "cold_start_s.median_abs_err": {"value": 0.05, "better": "lower", "tolerance": 0.04},
    "decision_agreement": {"value": 0.8, "better": "higher", "tolerance": 0.2},
    "cold_start_tier_mismatch": {"value": 0.2, "better": "lower", "tolerance": 0.1}}}}, "hand")


def test_a_regression_names_the_metric_its_baseline_new_value_and_tolerance() -> None:
    verdict = compare(BASE, {"mvp": _fid(cold=0.2, agree=0.5)})
    bad = {f.metric for f in verdict.regressions}
    assert bad == {"cold_start_s.median_abs_err", "decision_agreement"}
    text = verdict.report()
    assert "REGRESSED: mvp cold_start_s.median_abs_err = 0.2000 (baseline 0.0500, tolerance 0.04" in text
    assert "REGRESSED: mvp decision_agreement = 0.5000 (baseline 0.8000, tolerance 0.2, higher is better" in text
    # tier mismatch: |9 - 8| + |0 - 2| over 10 live cold starts
    assert next(f.new for f in verdict.findings if f.metric == "cold_start_tier_mismatch") == pytest.approx(0.3)


def test_within_tolerance_passes_and_an_improvement_is_noted_not_failed() -> None:
    within = compare(BASE, {"mvp": _fid(cold=0.089, agree=0.61)})
    assert not within.regressions and not within.improvements
    better = compare(BASE, {"mvp": _fid(cold=0.0, agree=1.0, cold_starts_by_tier={"live": {"cloud": 5},
                                                                                  "sim": {"cloud": 5}})})
    assert not better.regressions
    assert {f.metric for f in better.improvements} == {"cold_start_s.median_abs_err", "cold_start_tier_mismatch"}
    assert "baseline can be tightened" in better.report()


@pytest.mark.parametrize(("fid", "match"), [
    (_fid(cold_start_s={"median_abs_err": None}), r"run mvp: metric cold_start_s\.median_abs_err is missing"),
    (_fid(decision_agreement=None), r"run mvp: metric decision_agreement is missing"),
    (_fid(cold_starts_by_tier={"live": {}, "sim": {"cloud": 1}}), r"cold_start_tier_mismatch: no live cold starts"),
])
def test_a_metric_missing_in_the_new_run_is_a_clear_error(fid: dict[str, Any], match: str) -> None:
    with pytest.raises(FidelityBaselineError, match=match):
        compare(BASE, {"mvp": fid})


def test_policies_must_match_and_a_malformed_baseline_names_the_field() -> None:
    with pytest.raises(FidelityBaselineError, match=r"no baseline for policies \['sllm'\]"):
        compare(BASE, {"mvp": _fid(), "sllm": _fid()})
    with pytest.raises(FidelityBaselineError, match=r"the run has no policies \['mvp'\]"):
        compare(BASE, {})
    with pytest.raises(FidelityBaselineError, match=r"hand: policies\.mvp\.x\.tolerance: -1"):
        parse_baseline({"policies": {"mvp": {"x": {"value": 0.1, "better": "lower", "tolerance": -1}}}}, "hand")
    with pytest.raises(FidelityBaselineError, match=r"hand: policies\.mvp\.x\.better: 'up'"):
        parse_baseline({"policies": {"mvp": {"x": {"value": 0.1, "better": "up", "tolerance": 0.1}}}}, "hand")


def test_the_stored_baseline_guards_every_metric_of_both_policies_with_a_reason() -> None:
    raw = json.loads(BASELINE_PATH.read_text())
    setup = {"policies": list(POLICIES), "shared_overrides": list(SHARED_OVERRIDES),
             "workload_overrides": list(WORKLOAD_OVERRIDES)}
    assert raw["setup"] == setup, f"{BASELINE_PATH} was measured on another small twin; rerun {UPDATE_COMMAND}"
    base = load_baseline()
    assert set(base) == set(POLICIES)
    for policy, entries in base.items():
        assert set(entries) == set(GUARDED), policy
        for name, entry in entries.items():
            why = raw["policies"][policy][name]["why"]
            assert entry.tolerance > 0 and "default tolerance" not in why, (policy, name, why)
            assert entry.better == GUARDED[name].better


# --------------------------------------------------------------------------- one small real twin

pytest_e2e = pytest.mark.skipif(any(__import__("importlib").util.find_spec(d) is None
                                    for d in ("torch", "safetensors", "tokenizers", "uvicorn")),
                                reason="the live stack's dependencies are not installed")


@pytest.fixture(scope="module")
def small_twin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Calibrate once and run both policies live and simulated (about a minute of trace, ~75 s here)."""
    out = tmp_path_factory.mktemp("small_twin")
    t0 = time.monotonic()
    runs = run_small_twin(out, checkpoint_cache())
    print(f"small twin: {time.monotonic() - t0:.0f} s in {out}")
    return out, runs


@pytest_e2e
def test_the_small_twin_stays_within_the_fidelity_baseline(small_twin: tuple[Path, dict[str, Any]]) -> None:
    out, runs = small_twin
    for policy, fid in runs.items():
        r = fid["requests"]
        assert r["live"] == r["sim"] == r["joined"] >= 10 and not r["lost_live"], (policy, r)
    verdict = compare(load_baseline(), runs)
    print(verdict.report())
    assert not verdict.regressions, (f"twin fidelity regressed beyond {BASELINE_PATH.name}'s tolerance (runs in "
                                     f"{out}):\n{verdict.report()}")
    assert not [p.cmdline for p in processes() if str(out) in p.cmdline], "processes left running"


# The deliberately wrong description: the calibrated cloud per-stream rate / 4. mvp fetches every cold start from
# the cloud, so its cold-start latency and fetch phase must regress (over 7 recorded live runs: cold-start median
# |err| 0.54-1.31 and fetch 2.36-2.70 against bounds of 0.43 and 0.14). seed_tiered is not used here: its
# cold-start median is bimodal across runs (see the baseline's `why`), a wrong nvme rate moves its fetch median
# only in runs that happened to reload from nvme often, and some calibrations make its slower-cloud simulation
# crash (a decode table extrapolated to a negative step time), which would make this check flaky.
WRONG_FIELD = "cluster.store.per_stream_Bps"
MUST_REGRESS = {"cold_start_s.median_abs_err", "phases.fetch_s.median_abs_err"}


@pytest_e2e
def test_a_wrong_bandwidth_in_the_simulated_description_fails_the_baseline(
        small_twin: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, runs = small_twin
    # the re-simulation alone (live records from disk, no new live run) reproduces the twin's own numbers ...
    same = resimulate(out / "mvp", tmp_path / "same")
    assert guarded_metrics(same) == pytest.approx(guarded_metrics(runs["mvp"]))
    # ... so what fails below is the wrong bandwidth and nothing else
    wrong = resimulate(out / "mvp", tmp_path / "wrong", {WRONG_FIELD: 0.25})
    assert wrong["scaled"] == {WRONG_FIELD: 0.25}
    verdict = compare(load_baseline(), {"mvp": wrong}, require_all=False)
    print(verdict.report())
    assert {f.metric for f in verdict.regressions} >= MUST_REGRESS, verdict.report()
    for metric in MUST_REGRESS:
        assert f"REGRESSED: mvp {metric} = " in verdict.report()
