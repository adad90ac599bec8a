"""The benchmark regression check can fail: a deliberately slowed simulator is caught, a normal one is not;
the comparison, the baseline file, the check that ends a pytest run and the baseline update, each for real."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.benchmarks.regression import (
    BASELINE_ENV,
    DEFAULT_TOLERANCE,
    MAX_TOLERANCE,
    NOISE_MARGIN,
    RECORD_ENV,
    REPO,
    BaselineEntry,
    BaselineError,
    Regression,
    baseline_path,
    compare,
    load_baseline,
    main,
    unbaselined,
)
from tests.benchmarks.simspeed import SIM_METRIC, SLOWDOWN_ENV, measure, slowdown_from_env, slowed

# ------------------------------------------------------------------------------------------- slowed run
# The world's event loop (~88% of a run's CPU; collecting the records is not slowed) costs 3.5x: the ratio falls
# to ~0.3-0.4x (measured 0.12 against 0.31). Normal ratios measured 0.23 (busy machine) to 0.33 (quiet), so a
# slowed one of ~0.1 stays below the bound (0.75x a baseline of 0.23) even with the bare loop's CPU time 50% off,
# as seen under load.
SLOWDOWN = 3.5


def test_slowed_simulator_is_caught_and_the_normal_one_is_not(quick_sim):
    if os.environ.get(SLOWDOWN_ENV):
        pytest.skip(f"{SLOWDOWN_ENV} is set: the normal run is slowed too")
    baseline = load_baseline(baseline_path())
    normal = quick_sim.run()  # the benchmark's own run when test_bench_sim ran first in this session
    slow = measure(quick_sim.setup, rounds=2, slowdown=SLOWDOWN)
    assert all(o["requests"] == slow.requests for o in slow.outputs)  # the slowed runs simulated everything
    assert compare({SIM_METRIC: normal.cpu_ratio}, baseline) == []
    regressions = compare({SIM_METRIC: slow.cpu_ratio}, baseline)
    print(f"\nnormal ratio {normal.cpu_ratio:.3f}, slowed x{SLOWDOWN} {slow.cpu_ratio:.3f}:"
          f" {'; '.join(map(str, regressions))}")
    assert [r.metric for r in regressions] == [SIM_METRIC]
    r = regressions[0]
    assert r.measured < r.allowed < r.baseline == baseline[SIM_METRIC].value


class _Work:
    def run(self, cpu_s: float) -> str:
        t0 = time.process_time()
        while time.process_time() - t0 < cpu_s:
            pass
        return "done"


class _Child(_Work):
    pass


def test_slowed_stretches_each_call_and_restores_the_method():
    original = _Work.run
    with slowed(_Work, "run", 3.0):
        assert _Work.run is not original
        t0 = time.process_time()
        assert _Work().run(0.01) == "done"
        # the call itself uses >= 10 ms of CPU, then 2x its own CPU time more: a lower bound, whatever the load
        assert time.process_time() - t0 >= 0.03
    assert _Work.run is original
    with slowed(_Child, "run", 2.0):  # inherited: patched on the subclass only, then removed again
        assert _Child.run is not original and _Work.run is original
    assert "run" not in vars(_Child)


@pytest.mark.parametrize("factor", [0.5, math.nan, math.inf])
def test_slowed_rejects_a_speedup_or_nonsense(factor):
    with pytest.raises(ValueError, match="slowdown factor"), slowed(_Work, "run", factor):
        pass
    assert "run" in vars(_Work)


@pytest.mark.parametrize("raw", ["fast", "0.5", "nan"])
def test_slowdown_env_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv(SLOWDOWN_ENV, raw)
    with pytest.raises(ValueError, match=SLOWDOWN_ENV):
        slowdown_from_env()


# ------------------------------------------------------------------------------------------- compare
HIGHER = BaselineEntry(value=0.4, better="higher", tolerance=0.2)
LOWER = BaselineEntry(value=2.0, better="lower", tolerance=0.25)


def test_compare_flags_only_what_is_worse_than_allowed():
    baseline = {"a": HIGHER, "b": LOWER}
    assert HIGHER.allowed == pytest.approx(0.32) and LOWER.allowed == pytest.approx(2.5)
    assert compare({"a": 0.33, "b": 2.4}, baseline) == []
    assert compare({"a": 0.9, "b": 0.1}, baseline) == []  # better than the baseline is never a regression
    assert compare({"a": HIGHER.allowed, "b": LOWER.allowed}, baseline) == []  # the bound itself passes
    assert compare({"a": 0.31, "b": 2.6}, baseline) == [Regression("a", 0.4, 0.31, HIGHER.allowed, "higher", 0.2),
                                                       Regression("b", 2.0, 2.6, LOWER.allowed, "lower", 0.25)]
    text = str(compare({"a": 0.2}, baseline)[0])
    assert "a: measured 0.2, baseline 0.4 (-50%), allowed >= 0.32" in text and "tolerance 20%" in text


def test_an_unjudged_metric_never_regresses():
    info = BaselineEntry(value=2.0, better="higher", tolerance=None, why="too noisy here")
    assert compare({"info": 0.01, "a": 0.1}, {"info": info, "a": HIGHER}) == [
        Regression("a", 0.4, 0.1, HIGHER.allowed, "higher", 0.2)]


def test_compare_counts_a_broken_measurement_and_skips_what_was_not_measured():
    baseline = {"a": HIGHER, "b": LOWER}
    assert [r.metric for r in compare({"a": math.nan}, baseline)] == ["a"]
    assert [r.metric for r in compare({"b": math.inf}, baseline)] == ["b"]
    assert compare({}, baseline) == []
    assert compare({"new": 0.0}, baseline) == [] and unbaselined({"new": 0.0, "a": 1.0}, baseline) == ["new"]


# ------------------------------------------------------------------------------------------- baseline file
def _write(path: Path, doc: object) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _entry(**kw: object) -> dict[str, object]:
    return {"value": 0.5, "better": "higher", "tolerance": 0.2, "why": "test", **kw}


@pytest.mark.parametrize(("doc", "message"), [
    ("{not json", "not a readable JSON baseline"),
    ({"metrics": []}, "'metrics' object"),
    ({"metrics": {"m": 3}}, "metrics.m must be an object"),
    ({"metrics": {"m": _entry(value=None)}}, "metrics.m.value must be a finite number"),
    ({"metrics": {"m": _entry(value=0)}}, "metrics.m.value must be > 0"),
    ({"metrics": {"m": _entry(better="up")}}, "metrics.m.better must be one of"),
    ({"metrics": {"m": _entry(tolerance=0)}}, "metrics.m.tolerance must be in"),
    ({"metrics": {"m": _entry(tolerance=MAX_TOLERANCE + 0.01)}}, "metrics.m.tolerance must be in"),
    ({"metrics": {"m": _entry(tolerance="10%")}}, "metrics.m.tolerance must be a finite number"),
    ({"metrics": {"m": _entry(why=1)}}, "metrics.m.why must be a string"),
    ({"metrics": {"m": {"value": 1.0, "better": "lower"}}}, "metrics.m.tolerance is missing"),
    ({"metrics": {"m": _entry(tolerance=None, why=" ")}}, "metrics.m.why must say why"),
])
def test_bad_baseline_names_the_file_and_field(tmp_path, doc, message):
    path = _write(tmp_path / "baseline.json", doc)
    with pytest.raises(BaselineError, match=message) as e:
        load_baseline(path)
    assert str(path) in str(e.value)


def test_missing_baseline_names_the_file(tmp_path):
    with pytest.raises(BaselineError, match=re.escape(f"{tmp_path / 'missing.json'}: no such baseline file")):
        load_baseline(tmp_path / "missing.json")


def test_stored_baseline_is_valid_and_justified():
    baseline = load_baseline(Path(__file__).with_name("baseline.json"))
    raw = json.loads(Path(__file__).with_name("baseline.json").read_text())["metrics"]
    assert SIM_METRIC in baseline
    for name, entry in baseline.items():
        assert entry.why.strip(), f"{name}: say why the tolerance is what it is"
        spread = raw[name]["spread"]
        assert spread["runs"] >= 3 and spread["min"] <= entry.value <= spread["max"]
        if entry.tolerance is not None:
            # room for the noise measured, without being so wide that nothing can fail
            assert NOISE_MARGIN * spread["max_dev_from_median"] <= entry.tolerance <= MAX_TOLERANCE


# ------------------------------------------------------------------------------------------- a real pytest run
PROBE_TEST = """
import os
from pathlib import Path


def test_probe(report_metric):
    values = os.environ["PROBE_VALUES"].split(",")
    counter = Path(os.environ["PROBE_COUNTER"])  # one value per run, in turn
    done = counter.read_text().count("x") if counter.exists() else 0
    counter.write_text("x" * (done + 1))
    report_metric("probe.ratio", float(values[done % len(values)]), "higher")
    report_metric("probe.cpu", 1.0, "lower")


def test_plain():
    pass
"""
PROBE_BASELINE = {"probe.ratio": _entry(value=1.0, tolerance=0.2), "probe.cpu": _entry(better="lower", value=1.0)}
# the probe runs need no installed plugin (the check is loaded as the probe's conftest): a faster start
NO_PLUGINS = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


@pytest.fixture
def probe(tmp_path):
    """A benchmark directory of its own: the regression plumbing as conftest, a metric-reporting test."""
    d = tmp_path / "probe"
    d.mkdir()
    (d / "pytest.ini").write_text("[pytest]\n")  # not the repository's options
    (d / "conftest.py").write_text("from tests.benchmarks.conftest import (  # noqa: F401\n"
                                   "    pytest_collection_modifyitems, pytest_configure, report_metric)\n")
    (d / "test_probe.py").write_text(PROBE_TEST)
    _write(d / "baseline.json", {"metrics": PROBE_BASELINE})
    return d


def _pytest(probe: Path, values: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if k != RECORD_ENV}, **NO_PLUGINS, "PYTHONPATH": str(REPO),
           BASELINE_ENV: str(probe / "baseline.json"), "PROBE_VALUES": values,
           "PROBE_COUNTER": str(probe / f"counter-{values}")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
                          cwd=probe, env=env, capture_output=True, text=True, timeout=120)


def test_a_pytest_run_fails_listing_each_regression_and_passes_without_one(probe):
    good = _pytest(probe, "0.9")
    assert good.returncode == 0 and "3 passed" in good.stdout, good.stdout + good.stderr
    _write(probe / "baseline.json", {"metrics": {"probe.ratio": PROBE_BASELINE["probe.ratio"]}})
    bad = _pytest(probe, "0.7")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "REGRESSION probe.ratio: measured 0.7, baseline 1 (-30%), allowed >= 0.8" in bad.stdout
    assert "NO BASELINE for probe.cpu" in bad.stdout
    assert "FAILED" in bad.stdout and "benchmark_regression_check" in bad.stdout and "1 failed, 2 passed" in bad.stdout


def test_update_writes_medians_and_spread_keeping_tolerance_and_unmeasured_entries(probe, monkeypatch, capsys):
    path = _write(probe / "baseline.json", {"metrics": {"probe.ratio": _entry(value=2.0, tolerance=0.3, why="kept"),
                                                        "other.metric": _entry(why="not measured")}})
    for k, v in {**NO_PLUGINS, "PROBE_VALUES": "0.9,1.2", "PROBE_COUNTER": str(probe / "counter")}.items():
        monkeypatch.setenv(k, v)
    assert main(["--update", "--runs", "2", "--baseline", str(path), str(probe / "test_probe.py")]) == 0
    doc = json.loads(path.read_text())["metrics"]
    assert doc["other.metric"] == _entry(why="not measured")
    ratio, cpu = doc["probe.ratio"], doc["probe.cpu"]
    assert (ratio["value"], ratio["tolerance"], ratio["why"]) == (1.05, 0.3, "kept")
    assert (ratio["spread"]["runs"], ratio["spread"]["min"], ratio["spread"]["max"]) == (2, 0.9, 1.2)
    assert ratio["spread"]["max_dev_from_median"] == pytest.approx(0.15 / 1.05, abs=1e-4)
    assert (cpu["value"], cpu["better"], cpu["tolerance"]) == (1.0, "lower", DEFAULT_TOLERANCE)  # new: default
    assert load_baseline(path)["probe.ratio"].allowed == pytest.approx(1.05 * 0.7)
    out = capsys.readouterr().out
    assert "probe.ratio: median 1.05 (was 2)" in out and "probe.cpu: median 1 (was new)" in out
