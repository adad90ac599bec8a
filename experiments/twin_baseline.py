"""Twin fidelity baseline: a small twin's errors against a stored baseline, so CI notices a fidelity regression.

The small twin (`run_small_twin`): calibrate once, then `POLICIES` (mvp, seed_tiered), each on its own 30 s
Poisson slice (about a minute of trace in all), with the overrides that make tiny models cold-start from the
cloud and the local tiers on 2 shared cores (`SHARED_OVERRIDES`, as `conf/live/twin.yaml`'s report block, pinned
here so that the baseline keeps the setup it was measured with).

`GUARDED` names the fidelity metrics the baseline keeps per policy (relative errors (sim - live) / live, as
`experiments.twin_join`), with the direction that is better. The baseline file
(`tests/live_serve/fidelity_baseline.json`) holds per policy and metric the median over repeated runs, the spread
seen and an absolute tolerance in error units with the reason for it. `compare` fails a metric whose error grew
beyond baseline + tolerance (or an agreement that fell below baseline - tolerance); improvements are noted, not
failed. `resimulate` re-runs only the simulated half of a finished twin on an edited calibration (e.g. a wrong
bandwidth) and rejoins it with the live records on disk: how the test proves that the check can fail.

    python -m experiments.twin_baseline --update             # 3 small twins; writes medians and spread,
                                                             # keeps each metric's tolerance and reason
    python -m experiments.twin_baseline --runs 3 --dry-run   # only print medians and spread
    python -m experiments.twin_baseline --check OUT_DIR      # compare a finished small twin with the baseline

After an update, read the new spread against each tolerance (a warning names any under NOISE_MARGIN x the
largest deviation) and revise the `why` texts, which quote the numbers they were set from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from experiments.setup import REPO_ROOT

BASELINE_PATH = REPO_ROOT / "tests" / "live_serve" / "fidelity_baseline.json"
UPDATE_COMMAND = "python -m experiments.twin_baseline --update"
POLICIES: tuple[str, ...] = ("mvp", "seed_tiered")
#: as conf/live/twin.yaml's report.overrides: tiny models, one engine per node, slow tiers and cloud
SHARED_OVERRIDES: tuple[str, ...] = (
    "~catalog.small-a", "+catalog.tiny-c={preset: tiny, seed: 3}", "+catalog.tiny-d={preset: tiny, seed: 4}",
    "nodes=2", "node.memory_budget=25M", "tiers.dram.capacity=25M", "tiers.nvme.capacity=25M",
    "tiers.nvme.read_MBps=20", "tiers.nvme.write_MBps=15", "tiers.sata.read_MBps=10", "tiers.sata.write_MBps=8",
    "cloud.streams=2", "cloud.stream_MBps=5", "probe.repeats=1", "probe.prefill_lengths=[16,64]",
    "probe.decode_batches=[1,2]", "probe.decode_tokens=8")
#: a 30 s slice per policy at 0.5 requests/s (the steady workload of the report, 10 s longer)
WORKLOAD_OVERRIDES: tuple[str, ...] = (
    "workload=poisson", "workload.options.rate_per_s=0.5", "workload.options.duration_s=30",
    "workload.window=[0,30]", "workload.max_requests=20")
DIRECTIONS = ("lower", "higher")
NOISE_MARGIN = 1.5  # a tolerance should be at least this many times the largest deviation seen over repeated runs


class FidelityBaselineError(ValueError):
    """A baseline or fidelity that cannot be compared; the message names the file (or run) and the field."""


@dataclasses.dataclass(frozen=True)
class Guard:
    """A guarded metric: which way is better and the tolerance a new metric starts with (until measured)."""

    better: str
    default_tolerance: float
    about: str


GUARDED: dict[str, Guard] = {
    "cold_start_s.median_abs_err": Guard("lower", 0.05, "cold-start latency, median |rel err| per request"),
    "ttft_s.median_abs_err": Guard("lower", 0.10, "TTFT, median |rel err| per request"),
    "run_ttft_p50_abs_err": Guard("lower", 0.10, "|sim TTFT p50 - live TTFT p50| / live TTFT p50 of the run"),
    "phases.fetch_s.median_abs_err": Guard("lower", 0.05, "fetch phase (tier/cloud -> host), median |rel err|"),
    "phases.engine_init_s.median_abs_err": Guard("lower", 0.05, "engine start phase, median |rel err|"),
    "decision_agreement": Guard("higher", 0.15, "share of requests with the same cold/warm, node and tier"),
    "cold_start_tier_mismatch": Guard("lower", 0.15, "sum over tiers |sim - live| cold starts / live cold starts"),
}


# --------------------------------------------------------------------------- metrics


def add_run_ttft(fid: dict[str, Any], joined: pd.DataFrame) -> dict[str, Any]:
    """Lay the run-level TTFT p50 error over `fid` (fidelity.json has only per-request errors); `fid`."""
    both = joined[joined["in_live"] & joined["in_sim"]]
    live = both["ttft_s_live"].astype(float).dropna()
    sim = both["ttft_s_sim"].astype(float).dropna()
    p50_live = float(live.median()) if len(live) else math.nan
    fid["run_ttft_p50_abs_err"] = (abs(float(sim.median()) - p50_live) / p50_live
                                   if len(sim) and p50_live > 0 else None)
    return fid


def load_run(run_dir: Path) -> dict[str, Any]:
    """A finished twin's fidelity.json with the run-level TTFT error (from twin.parquet) laid over it."""
    path = run_dir / "fidelity.json"
    try:
        fid = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FidelityBaselineError(f"{path}: cannot read the twin's fidelity ({e})") from None
    return add_run_ttft(fid, pd.read_parquet(run_dir / "twin.parquet"))


def metric_value(fid: Mapping[str, Any], name: str, source: str = "fidelity") -> float:
    """One guarded metric of a fidelity dict; FidelityBaselineError naming `source` and the metric if absent."""
    if name == "cold_start_tier_mismatch":
        by_tier = fid.get("cold_starts_by_tier")
        if not isinstance(by_tier, Mapping) or not all(isinstance(by_tier.get(k), Mapping) for k in ("live", "sim")):
            raise FidelityBaselineError(f"{source}: metric {name}: no cold_starts_by_tier.live/.sim")
        live, sim = by_tier["live"], by_tier["sim"]
        n_live = sum(live.values())
        if n_live == 0:
            raise FidelityBaselineError(f"{source}: metric {name}: no live cold starts to compare with")
        return sum(abs(sim.get(t, 0) - live.get(t, 0)) for t in set(live) | set(sim)) / n_live
    value: Any = fid
    for part in name.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FidelityBaselineError(f"{source}: metric {name} is missing or not a finite number ({value!r}); "
                                    "the run has none of it (no such requests?) or fidelity.json changed")
    return float(value)


def guarded_metrics(fid: Mapping[str, Any], source: str = "fidelity") -> dict[str, float]:
    """Every metric of `GUARDED` from one run's fidelity."""
    return {name: metric_value(fid, name, source) for name in GUARDED}


# --------------------------------------------------------------------------- baseline and comparison


@dataclasses.dataclass(frozen=True)
class Entry:
    """A metric's baseline value, the better direction and the absolute tolerance (error units)."""

    value: float
    better: str
    tolerance: float

    @property
    def bound(self) -> float:
        """The worst value that still passes."""
        return self.value + self.tolerance if self.better == "lower" else self.value - self.tolerance


@dataclasses.dataclass(frozen=True)
class Finding:
    """One metric of one policy, compared."""

    policy: str
    metric: str
    entry: Entry
    new: float

    @property
    def regressed(self) -> bool:
        return self.new > self.entry.bound if self.entry.better == "lower" else self.new < self.entry.bound

    @property
    def improved(self) -> bool:
        """Better than the baseline by more than the tolerance: the baseline could be tightened."""
        e = self.entry
        return self.new < e.value - e.tolerance if e.better == "lower" else self.new > e.value + e.tolerance

    def line(self) -> str:
        e = self.entry
        verdict = "REGRESSED" if self.regressed else "improved" if self.improved else "ok"
        return (f"{verdict}: {self.policy} {self.metric} = {self.new:.4f} (baseline {e.value:.4f}, tolerance "
                f"{e.tolerance:g}, {e.better} is better, bound {e.bound:.4f})")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Every finding of one comparison."""

    findings: list[Finding]

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.regressed]

    @property
    def improvements(self) -> list[Finding]:
        return [f for f in self.findings if f.improved]

    def report(self) -> str:
        """One line per finding, regressions first; how to refresh the baseline when one improved."""
        order = sorted(self.findings, key=lambda f: (not f.regressed, not f.improved))
        lines = [f.line() for f in order]
        if self.improvements:
            lines.append(f"(improved beyond tolerance: the baseline can be tightened with `{UPDATE_COMMAND}`)")
        return "\n".join(lines)


def load_baseline(path: Path = BASELINE_PATH) -> dict[str, dict[str, Entry]]:
    """{policy: {metric: Entry}} from a baseline file; FidelityBaselineError naming the file and field."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FidelityBaselineError(f"{path}: cannot read the fidelity baseline ({e}); make it with "
                                    f"`{UPDATE_COMMAND}`") from None
    return parse_baseline(raw, str(path))


def parse_baseline(raw: Any, source: str = "baseline") -> dict[str, dict[str, Entry]]:
    """Validate a baseline's content (`policies.<policy>.<metric>.{value, better, tolerance}`)."""
    policies = raw.get("policies") if isinstance(raw, Mapping) else None
    if not isinstance(policies, Mapping) or not policies:
        raise FidelityBaselineError(f"{source}: no `policies` mapping")
    out: dict[str, dict[str, Entry]] = {}
    for policy, metrics in policies.items():
        if not isinstance(metrics, Mapping) or not metrics:
            raise FidelityBaselineError(f"{source}: policies.{policy}: no metrics")
        out[policy] = {}
        for name, e in metrics.items():
            field = f"{source}: policies.{policy}.{name}"
            if not isinstance(e, Mapping):
                raise FidelityBaselineError(f"{field}: not a mapping")
            value, tol, better = e.get("value"), e.get("tolerance"), e.get("better")
            if better not in DIRECTIONS:
                raise FidelityBaselineError(f"{field}.better: {better!r}, not one of {DIRECTIONS}")
            for key, v in (("value", value), ("tolerance", tol)):
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                    raise FidelityBaselineError(f"{field}.{key}: {v!r} is not a finite number >= 0")
            out[policy][name] = Entry(float(value), better, float(tol))
    return out


def compare(baseline: Mapping[str, Mapping[str, Entry]], runs: Mapping[str, Mapping[str, Any]],
            require_all: bool = True) -> Verdict:
    """Each baseline metric of each policy in `runs` ({policy: fidelity dict}) against its baseline entry.

    A policy of `runs` without a baseline, a baseline policy absent from `runs` (when `require_all`), or a baseline
    metric the run lacks is a FidelityBaselineError naming them: a check that silently skips is no check."""
    unknown = sorted(set(runs) - set(baseline))
    if unknown:
        raise FidelityBaselineError(f"no baseline for policies {unknown} (baseline has {sorted(baseline)}); "
                                    f"run `{UPDATE_COMMAND}`")
    absent = sorted(set(baseline) - set(runs))
    if require_all and absent:
        raise FidelityBaselineError(f"the run has no policies {absent} that the baseline holds")
    findings = []
    for policy, fid in runs.items():
        for name, entry in baseline[policy].items():
            new = metric_value(fid, name, f"run {policy}")
            findings.append(Finding(policy, name, entry, new))
    return Verdict(findings)


# --------------------------------------------------------------------------- running the small twin


def _run(argv: list[str], log_path: Path, timeout_s: float) -> None:
    """Run one tierlab command (bounded), its output into `log_path`; RuntimeError naming the log if it fails."""
    from experiments.twin_run_report import _run as run_logged

    run_logged(argv, log_path, timeout_s)


def run_small_twin(out_dir: Path, checkpoint_cache: str | Path, policies: Sequence[str] = POLICIES,
                   timeout_s: float = 300.0) -> dict[str, dict[str, Any]]:
    """Calibrate once into OUT/calibrate, run the twin per policy into OUT/<policy> on that calibration;
    {policy: fidelity (with the run-level TTFT error)}."""
    common = ["progress=false", f"checkpoint_cache={checkpoint_cache}", *SHARED_OVERRIDES]
    calib_dir = out_dir / "calibrate"
    _run([sys.executable, "-m", "experiments.calibrate", f"hydra.run.dir={calib_dir}", *common],
         out_dir / "calibrate.log", timeout_s)
    out: dict[str, dict[str, Any]] = {}
    for policy in policies:
        run_dir = out_dir / policy
        _run([sys.executable, "-m", "experiments.twin", f"hydra.run.dir={run_dir}", *common, *WORKLOAD_OVERRIDES,
              f"calibration={calib_dir / 'calibrated.yaml'}", f"policy={policy}", "seed=0"],
             out_dir / f"{policy}.log", timeout_s)
        out[policy] = load_run(run_dir)
    return out


def scale_calibration(calib: dict[str, Any], scale: Mapping[str, float]) -> dict[str, Any]:
    """Multiply the calibrated.yaml fields named by dotted paths (list items by index), e.g.
    {"cluster.store.per_stream_Bps": 0.25}; a path that names no number is a FidelityBaselineError."""
    for path, factor in scale.items():
        node: Any = calib
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) and part.isdigit() else (
                node.get(part) if isinstance(node, dict) else None)
        leaf = parts[-1]
        if not isinstance(node, dict) or not isinstance(node.get(leaf), int | float):
            raise FidelityBaselineError(f"calibration: {path} names no number")
        node[leaf] = float(node[leaf]) * factor
    return calib


def resimulate(run_dir: Path, out_dir: Path, scale: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The simulated half of the finished twin in `run_dir` again, on its calibration with `scale` applied,
    joined with the live records already on disk (no live run); writes OUT/{calibrated.yaml, sim/, fidelity.json}
    and returns the fidelity (with the run-level TTFT error)."""
    from core.metrics import _clean
    from experiments.replay import ReplayOptions
    from experiments.serve_catalog import build_catalog, catalog_model_specs, engine_dtype_bytes
    from experiments.twin import TwinLimits, run_sim, twin_workload
    from experiments.twin_join import fidelity, join

    cfg_path = run_dir / ".hydra" / "config.yaml"
    try:
        cfg = yaml.safe_load(cfg_path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise FidelityBaselineError(f"{cfg_path}: cannot read the twin's config ({e})") from None
    if not cfg.get("calibration"):
        raise FidelityBaselineError(f"{cfg_path}: calibration is null; resimulate needs a twin run with "
                                    "calibration=PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    calib = scale_calibration(yaml.safe_load(Path(cfg["calibration"]).read_text()), scale or {})
    calibration = out_dir / "calibrated.yaml"
    calibration.write_text(yaml.safe_dump(calib, sort_keys=False))
    opts = ReplayOptions(**dict(cfg.get("replay") or {}))
    entries = build_catalog(cfg.get("catalog") or {}, str(cfg.get("checkpoint_cache", "~/.cache/tierlab")), False)
    specs = catalog_model_specs(entries, engine_dtype_bytes(cfg))
    wl = twin_workload(cfg, [e.name for e in entries], opts)  # the same slice: same seed, models and clipping
    sim = run_sim(cfg, calibration, wl, specs, TwinLimits(**dict(cfg.get("twin") or {})), out_dir / "sim")
    live = pd.read_parquet(run_dir / "live" / "records.parquet")
    joined = join(live, sim)
    fid = fidelity(live, sim, joined, extra={"policy": cfg["policy"].get("name"), "workload": wl.name,
                                             "calibration": str(calibration), "scaled": dict(scale or {})})
    (out_dir / "fidelity.json").write_text(json.dumps(_clean(fid), indent=2))
    return add_run_ttft(fid, joined)


# --------------------------------------------------------------------------- update


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and largest deviation from the median of one metric over repeated runs."""
    med = statistics.median(values)
    return {"runs": len(values), "median": round(med, 4), "min": round(min(values), 4), "max": round(max(values), 4),
            "max_dev_from_median": round(max(abs(v - med) for v in values), 4),
            "values": [round(v, 4) for v in values]}


def updated_baseline(old: Mapping[str, Any] | None, runs: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """A new baseline from repeated runs ([{policy: fidelity}]): medians and spread, each metric's tolerance and
    reason kept from `old` (a new metric gets its default tolerance, to be looked at)."""
    old_policies = (old or {}).get("policies") or {}
    policies: dict[str, Any] = {}
    for policy in runs[0]:
        entries = {}
        for name, guard in GUARDED.items():
            values = [metric_value(r[policy], name, f"run {i} {policy}") for i, r in enumerate(runs)]
            prev = old_policies.get(policy, {}).get(name, {})
            s = spread(values)
            entries[name] = {"value": s["median"], "better": guard.better,
                             "tolerance": prev.get("tolerance", guard.default_tolerance),
                             "why": prev.get("why", f"{guard.about}; default tolerance, not yet set from the spread"),
                             "spread": s}
        policies[policy] = entries
    about = (old or {}).get("about", "Fidelity errors of the small twin (experiments.twin_baseline); a run fails when "
                                     "an error grows beyond value + tolerance (absolute, error units).")
    return {"about": about, "update": UPDATE_COMMAND,
            "setup": {"policies": list(runs[0]), "shared_overrides": list(SHARED_OVERRIDES),
                      "workload_overrides": list(WORKLOAD_OVERRIDES)},
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            **{k: v for k, v in (old or {}).items() if k not in ("about", "update", "setup", "measured", "policies")},
            "policies": policies}


def _narrow(baseline: Mapping[str, Any]) -> list[str]:
    """Entries whose tolerance is under NOISE_MARGIN x the largest deviation seen: likely flaky."""
    return [f"{p}.{m}: tolerance {e['tolerance']} < {NOISE_MARGIN} x max deviation "
            f"{e['spread']['max_dev_from_median']}"
            for p, ms in baseline["policies"].items() for m, e in ms.items()
            if e["tolerance"] < NOISE_MARGIN * e["spread"]["max_dev_from_median"]]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: --update / --dry-run (repeated small twins), --check OUT_DIR (compare a finished small twin)."""
    ap = argparse.ArgumentParser(prog="python -m experiments.twin_baseline", description=__doc__.split("\n")[0])
    ap.add_argument("--update", action="store_true", help="run the small twin --runs times and rewrite the baseline")
    ap.add_argument("--dry-run", action="store_true", help="as --update but only print")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--check", type=Path, help="a run_small_twin output dir to compare with the baseline")
    ap.add_argument("--baseline", type=Path, default=BASELINE_PATH)
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary dir)")
    ap.add_argument("--checkpoint-cache", default="/tmp/tierlab-test-checkpoints")
    args = ap.parse_args(argv)
    if args.check:
        verdict = compare(load_baseline(args.baseline), {p: load_run(args.check / p) for p in POLICIES})
        print(verdict.report())
        return 1 if verdict.regressions else 0
    if not (args.update or args.dry_run):
        ap.error("one of --update, --dry-run, --check")
    out_root = args.out or Path(tempfile.mkdtemp(prefix="twin_baseline_"))
    runs = []
    for i in range(args.runs):
        t0 = time.monotonic()
        runs.append(run_small_twin(out_root / f"run{i}", args.checkpoint_cache))
        shown = "; ".join(f"{p}: " + ", ".join(f"{m}={v:.3f}" for m, v in guarded_metrics(f, p).items())
                          for p, f in runs[-1].items())
        print(f"run {i}: {time.monotonic() - t0:.0f} s; {shown}", flush=True)
    old = json.loads(args.baseline.read_text()) if args.baseline.is_file() else None
    new = updated_baseline(old, runs)
    text = json.dumps(new, indent=2) + "\n"
    if args.dry_run:
        print(text)
    else:
        args.baseline.write_text(text)
        print(f"baseline written to {args.baseline} (runs in {out_root})")
    for warning in _narrow(new):
        print(f"warning: {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
