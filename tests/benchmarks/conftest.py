"""Benchmark plumbing: the `report_metric` fixture and the regression check that runs last.

A benchmark publishes each same-run ratio with `report_metric(name, value, better)`. When any collected test
uses the fixture, a `RegressionCheck` item is appended after every other test of the session (the whole
suite, `tests/benchmarks` alone or one benchmark file): it compares what was reported with the baseline
(`regression.baseline_path()`) and fails listing each regression, or, with TIERLAB_BENCH_RECORD set, writes
the metrics there instead (for `python -m tests.benchmarks.regression --update`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.benchmarks.regression import (
    DIRECTIONS,
    RECORD_ENV,
    Metric,
    Regression,
    baseline_path,
    compare,
    load_baseline,
    unbaselined,
    write_metrics,
)

METRICS = pytest.StashKey[dict[str, Metric]]()
CHECK_NAME = "benchmark_regression_check"


def pytest_configure(config: pytest.Config) -> None:
    config.stash[METRICS] = {}


@pytest.fixture
def report_metric(request: pytest.FixtureRequest) -> Callable[[str, float, str], None]:
    """`report(name, value, better)`: publish a same-run ratio for the regression check ("higher" or "lower"
    is better)."""
    store = request.config.stash[METRICS]

    def report(name: str, value: float, better: str) -> None:
        if better not in DIRECTIONS:
            raise ValueError(f"metric {name}: better must be one of {DIRECTIONS}, got {better!r}")
        if name in store:
            raise ValueError(f"metric {name} reported twice in one session")
        store[name] = Metric(float(value), better)

    return report


class RegressionFailure(Exception):
    """Metrics worse than the baseline allows, or without a baseline."""

    def __init__(self, path: Path, regressions: list[Regression], unknown: list[str]) -> None:
        super().__init__(path, regressions, unknown)
        self.path, self.regressions, self.unknown = path, regressions, unknown

    def __str__(self) -> str:
        lines = [f"benchmark regression against {self.path}:"]
        lines += [f"  REGRESSION {r}" for r in self.regressions]
        lines += [f"  NO BASELINE for {n}: add it with `python -m tests.benchmarks.regression --update`"
                  for n in self.unknown]
        if self.regressions:
            lines.append("  (an intended change? refresh the baseline: python -m tests.benchmarks.regression --update)")
        return "\n".join(lines)


class RegressionCheck(pytest.Item):
    """Compares the metrics the session's benchmarks reported with the stored baseline."""

    def runtest(self) -> None:
        metrics = self.config.stash[METRICS]
        record = os.environ.get(RECORD_ENV)
        if record:
            write_metrics(Path(record), metrics)
            pytest.skip(f"{len(metrics)} metric(s) recorded to {record} ({RECORD_ENV}), not compared")
        if not metrics:
            pytest.skip("no benchmark reported a metric (skipped or failed before reporting)")
        path = baseline_path()
        baseline = load_baseline(path)
        measured = {n: m.value for n, m in metrics.items()}
        regressions, unknown = compare(measured, baseline), unbaselined(measured, baseline)
        for name in sorted(measured):  # shown with -s, and with the failure
            entry = baseline.get(name)
            if entry is None:
                verdict, ref = "no baseline", ""
            elif entry.tolerance is None:
                verdict, ref = "not judged", f" (baseline {entry.value:.4g})"
            else:
                verdict = "ok" if entry.passes(measured[name]) else "REGRESSION"
                ref = f" (baseline {entry.value:.4g}, allowed {entry.allowed:.4g})"
            print(f"{name}: {measured[name]:.4g}{ref} {verdict}")
        if regressions or unknown:
            raise RegressionFailure(path, regressions, unknown)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:  # type: ignore[override]
        if isinstance(excinfo.value, RegressionFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo, style=style))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{CHECK_NAME} (same-run ratios vs {baseline_path().name})"


@pytest.hookimpl(trylast=True)  # after -k / -m / --deselect have removed what will not run
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    reporting = [it for it in items if "report_metric" in getattr(it, "fixturenames", ())]
    if reporting and not any(isinstance(it, RegressionCheck) for it in items):
        module = reporting[0].parent
        directory = module.parent if module is not None and module.parent is not None else session
        items.append(RegressionCheck.from_parent(directory, name=CHECK_NAME))


@pytest.fixture(scope="session")
def quick_sim() -> Any:
    """The simulator benchmark's CI scenario, built once; `.run()` measures its paired run once."""
    from experiments.setup import build  # imported here: the regression plumbing itself stays light
    from tests.benchmarks.simspeed import QUICK, QUICK_ROUNDS, QuickSim
    from tests.conftest import config

    return QuickSim(build(config(*QUICK)), QUICK_ROUNDS)
