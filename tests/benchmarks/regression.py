"""Benchmark regression check: each benchmark's same-run ratio compared with a stored baseline.

Every benchmark measures tierlab against a reference timed in the same run (a bare SimPy loop, a raw file
read, a direct request to the engine), so a slow or busy machine moves both sides alike; the ratio is what
`baseline.json` stores, with its direction and a tolerance chosen from the spread measured over repeated
runs. A run fails when a ratio is worse than its baseline by more than the tolerance
(`tests/benchmarks/conftest.py` adds the check as the last test of any run that reports a metric). A metric
whose tolerance is null is recorded and printed but not judged: its spread here is too wide for any
tolerance that could still fail (the entry's `why` says so).

Refresh the baseline after an intended speed change (reruns the benchmarks, writes the medians and the
spread, keeps each metric's direction, tolerance and reason):

    python -m tests.benchmarks.regression --update              # 5 runs of tests/benchmarks/test_bench_*.py
    python -m tests.benchmarks.regression --runs 3 --dry-run    # only print medians and spread

Environment: TIERLAB_BENCH_BASELINE (another baseline file), TIERLAB_BENCH_RECORD (write the run's metrics to
this JSON file instead of checking them; what --update uses).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BASELINE_PATH = HERE / "baseline.json"
BASELINE_ENV = "TIERLAB_BENCH_BASELINE"
RECORD_ENV = "TIERLAB_BENCH_RECORD"
DIRECTIONS = ("higher", "lower")
DEFAULT_TOLERANCE = 0.25  # for a metric new to the baseline, until its spread has been looked at
MAX_TOLERANCE = 0.5  # wider than this and a halving of the speed would pass: no longer a check
NOISE_MARGIN = 1.5  # a tolerance should be at least this many times the worst deviation seen over repeated runs


class BaselineError(ValueError):
    """A baseline or metrics file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Metric:
    """One measured value and which way is better ("higher" or "lower")."""

    value: float
    better: str


@dataclass(frozen=True)
class BaselineEntry:
    """A metric's reference value, the direction that is better and the fraction it may worsen by (None:
    recorded, not judged)."""

    value: float
    better: str
    tolerance: float | None
    why: str = ""

    @property
    def allowed(self) -> float:
        """The worst value that still passes (any value, for a metric that is not judged)."""
        if self.tolerance is None:
            return -math.inf if self.better == "higher" else math.inf
        return self.value * (1 - self.tolerance) if self.better == "higher" else self.value * (1 + self.tolerance)

    def passes(self, measured: float) -> bool:
        if self.tolerance is None:
            return True
        if not math.isfinite(measured):
            return False
        return measured >= self.allowed if self.better == "higher" else measured <= self.allowed


@dataclass(frozen=True)
class Regression:
    """A metric measured worse than its baseline allows."""

    metric: str
    baseline: float
    measured: float
    allowed: float
    better: str
    tolerance: float

    def __str__(self) -> str:
        bound = ">=" if self.better == "higher" else "<="
        change = (self.measured / self.baseline - 1) if self.baseline else math.nan
        return (f"{self.metric}: measured {self.measured:.4g}, baseline {self.baseline:.4g} ({change:+.0%}), "
                f"allowed {bound} {self.allowed:.4g} ({self.better} is better, tolerance {self.tolerance:.0%})")


def compare(results: Mapping[str, float], baseline: Mapping[str, BaselineEntry]) -> list[Regression]:
    """The regressions among `results` (metric -> measured value), in metric order. A metric without a
    baseline entry is not judged here (see `unbaselined`); a baseline metric that was not measured (its
    benchmark skipped or not selected) is left out. A non-finite measurement counts as a regression."""
    out = []
    for name in sorted(results):
        entry = baseline.get(name)
        if entry is None:
            continue
        measured = float(results[name])
        if not entry.passes(measured):
            assert entry.tolerance is not None  # an unjudged metric always passes
            out.append(Regression(name, entry.value, measured, entry.allowed, entry.better, entry.tolerance))
    return out


def unbaselined(results: Mapping[str, Any], baseline: Mapping[str, BaselineEntry]) -> list[str]:
    """Measured metrics the baseline does not know (a new benchmark whose baseline was not written)."""
    return sorted(set(results) - set(baseline))


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BaselineError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _direction(where: str, value: Any) -> str:
    if value not in DIRECTIONS:
        raise BaselineError(f"{where} must be one of {DIRECTIONS}, got {value!r}")
    return value


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BaselineError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BaselineError(f"{path}: not a readable JSON {what} file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise BaselineError(f"{path}: expected a JSON object with a 'metrics' object")
    return data


def load_baseline(path: Path) -> dict[str, BaselineEntry]:
    """The baseline file's entries, validated: value > 0, better in DIRECTIONS, 0 < tolerance <= MAX_TOLERANCE
    (or null, with a reason in `why`)."""
    out = {}
    for name, raw in _read_json(path, "baseline")["metrics"].items():
        where = f"{path}: metrics.{name}"
        if not isinstance(raw, dict):
            raise BaselineError(f"{where} must be an object")
        value = _number(f"{where}.value", raw.get("value"))
        if value <= 0:
            raise BaselineError(f"{where}.value must be > 0 (a ratio), got {value!r}")
        if "tolerance" not in raw:
            raise BaselineError(f"{where}.tolerance is missing (a fraction, or null for a metric not judged)")
        tolerance = raw["tolerance"]
        if tolerance is not None:
            tolerance = _number(f"{where}.tolerance", tolerance)
            if not 0 < tolerance <= MAX_TOLERANCE:
                raise BaselineError(f"{where}.tolerance must be in (0, {MAX_TOLERANCE}], got {tolerance!r}")
        why = raw.get("why", "")
        if not isinstance(why, str):
            raise BaselineError(f"{where}.why must be a string, got {why!r}")
        if tolerance is None and not why.strip():
            raise BaselineError(f"{where}.why must say why a metric with a null tolerance is not judged")
        out[name] = BaselineEntry(value, _direction(f"{where}.better", raw.get("better")), tolerance, why)
    return out


def baseline_path() -> Path:
    """The baseline in use: TIERLAB_BENCH_BASELINE if set, else tests/benchmarks/baseline.json."""
    return Path(os.environ.get(BASELINE_ENV) or BASELINE_PATH)


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Write `doc` to `path` whole or not at all."""
    from experiments.serverlessllm import write_doc  # imported here: it loads pandas, which the check never needs

    write_doc(json.dumps(doc, indent=2) + "\n", path)


def write_metrics(path: Path, metrics: Mapping[str, Metric]) -> None:
    """Write a run's metrics as JSON (what --update reads back)."""
    write_json(path, {"metrics": {n: {"value": m.value, "better": m.better} for n, m in sorted(metrics.items())}})


def read_metrics(path: Path) -> dict[str, Metric]:
    out = {}
    for name, raw in _read_json(path, "metrics")["metrics"].items():
        where = f"{path}: metrics.{name}"
        if not isinstance(raw, dict):
            raise BaselineError(f"{where} must be an object")
        value = _number(f"{where}.value", raw.get("value"))
        out[name] = Metric(value, _direction(f"{where}.better", raw.get("better")))
    return out


# ------------------------------------------------------------------------------------------------ update
def run_benchmarks(tests: Sequence[str], record: Path, timeout_s: float) -> dict[str, Metric]:
    """One pytest run of `tests` in a subprocess recording its metrics (no comparison); raises on failure."""
    env = {**os.environ, RECORD_ENV: str(record),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    env.pop(BASELINE_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark run failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-4000:]}{proc.stderr[-2000:]}")
    if not record.is_file():
        raise RuntimeError(f"benchmark run reported no metric (no {record}):\n{proc.stdout[-2000:]}")
    return read_metrics(record)


def updated_baseline(runs: Sequence[Mapping[str, Metric]], old: Mapping[str, BaselineEntry],
                     old_raw: Mapping[str, Any], loads: Sequence[float]) -> dict[str, Any]:
    """The new baseline document: per measured metric the median over `runs`, the spread, and the old
    entry's tolerance and reason (DEFAULT_TOLERANCE for a new metric); entries of metrics not measured this
    time (`old_raw`, as stored) are kept. Metrics missing from some run are an error: a median of fewer runs
    would not be what the spread says."""
    names = sorted(set().union(*runs))
    metrics = {n: raw for n, raw in old_raw.items() if n not in names}
    for name in names:
        missing = [i for i, r in enumerate(runs) if name not in r]
        if missing:
            raise RuntimeError(f"metric {name} missing from run(s) {missing}: was a benchmark skipped?")
        values = [r[name].value for r in runs]
        better = {r[name].better for r in runs}
        if len(better) != 1:
            raise RuntimeError(f"metric {name} reported with different directions {sorted(better)}")
        median = statistics.median(values)
        entry = old.get(name)
        metrics[name] = {
            "value": round(median, 4),
            "better": better.pop(),
            "tolerance": entry.tolerance if entry else DEFAULT_TOLERANCE,
            "why": entry.why if entry else "new metric: default tolerance, review it against the spread",
            "spread": {"runs": len(values), "min": round(min(values), 4), "max": round(max(values), 4),
                       "max_dev_from_median": round(max(abs(v / median - 1) for v in values), 4),
                       "load_avg_1min": [round(x, 2) for x in loads]},
        }
    return {"about": "Same-run benchmark ratios; a run fails when a metric is worse than value by more than "
                     "tolerance. Update: python -m tests.benchmarks.regression --update (see its docstring).",
            "metrics": dict(sorted(metrics.items()))}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Rerun the benchmarks and refresh their regression baseline.")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--update", action="store_true", help="write the medians into the baseline")
    mode.add_argument("--dry-run", action="store_true", help="only print the medians and the spread")
    ap.add_argument("--runs", type=int, default=5, help="benchmark runs to take the median of (default 5)")
    ap.add_argument("--baseline", type=Path, default=None, help=f"baseline file (default {BASELINE_PATH})")
    ap.add_argument("--timeout-s", type=float, default=1200, help="limit for one benchmark run")
    ap.add_argument("tests", nargs="*", default=None, help="test files (default tests/benchmarks/test_bench_*.py)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error(f"--runs must be >= 1, got {args.runs}")
    path = args.baseline or baseline_path()
    tests = args.tests or sorted(str(p.relative_to(REPO)) for p in HERE.glob("test_bench_*.py"))
    old = load_baseline(path) if path.exists() else {}
    runs, loads = [], []
    with tempfile.TemporaryDirectory(prefix="tierlab-bench-") as tmp:
        for i in range(args.runs):
            loads.append(os.getloadavg()[0])
            runs.append(run_benchmarks(tests, Path(tmp) / f"run{i}.json", args.timeout_s))
            print(f"run {i + 1}/{args.runs}: " + ", ".join(f"{n} {m.value:.4g}" for n, m in sorted(runs[-1].items())),
                  flush=True)
    doc = updated_baseline(runs, old, _read_json(path, "baseline")["metrics"] if old else {}, loads)
    for name in sorted(set().union(*runs)):
        m = doc["metrics"][name]
        s = m["spread"]
        was = f"{old[name].value:.4g}" if name in old else "new"
        tol = m["tolerance"]
        noisy = tol is not None and NOISE_MARGIN * s["max_dev_from_median"] > tol
        warn = f"  <- tolerance under {NOISE_MARGIN}x the deviation seen: widen it?" if noisy else ""
        print(f"{name}: median {m['value']:.4g} (was {was}), min {s['min']:.4g}, max {s['max']:.4g}, "
              f"max deviation {s['max_dev_from_median']:.1%}, "
              f"tolerance {'none (not judged)' if tol is None else f'{tol:.0%}'}{warn}")
    if args.update:
        write_json(path, doc)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
