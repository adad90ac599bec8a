"""`python -m experiments.compare`: policies x seeds x scenarios, compared with bootstrap intervals over seeds.

Reads `conf/compare.yaml` (or `--config FILE`): the policies (`conf/policy` names), the seeds, and the
scenarios, each a list of hydra overrides (or null: the `conf/scenario` group of that name). Every combination
is one simulation, run in `workers` parallel processes; a seed fixes the trace, so the policies' runs on one
seed see the same requests and their differences are paired (`experiments.compare_stats`). Writes
`docs/policies.md` (tables with 95% intervals, pairwise differences, targets, the command and its wall time),
figures under `docs/policies/` and every run's numbers in `docs/policies/runs.json`, then prints one line.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.errors import ConfigError
from core.specs import TIER_ORDER
from experiments.entry import CONF_DIR

MODULE = "experiments.compare"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = Path(CONF_DIR) / "compare.yaml"
DOCS = REPO / "docs"

#: per-run metrics: key -> (summary path, label, unit); the cold-start ones are over completed cold requests
METRICS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "cold_mean_s": (("cold_start_s", "mean"), "mean cold start", " s"),
    "cold_p50_s": (("cold_start_s", "p50"), "p50 cold start", " s"),
    "cold_p99_s": (("cold_start_s", "p99"), "p99 cold start", " s"),
    "ttft_p99_s": (("ttft_s", "p99"), "p99 TTFT", " s"),
    "cost_usd": (("cost_usd",), "cost", " $"),
    "slo_attainment": (("slo_attainment",), "SLO attainment", ""),
    "cold_starts": (("cold_starts",), "cold starts", ""),
}
#: cold-start requests by source tier (`cold_<tier>`) and instance loads by source tier (`loads_<tier>`)
TIER_KEYS: tuple[str, ...] = tuple(f"cold_{t}" for t in TIER_ORDER) + tuple(f"loads_{t}" for t in TIER_ORDER)
#: per source tier, over its cold-start requests: the mean cold start and the mean load phases they waited on
#: (`<phase>_<tier>` -> the summary's cold_start_by_tier key); None where the tier served no cold start
PHASES: dict[str, str] = {"coldmean": "mean_s", "fetch": "fetch_mean_s", "togpu": "to_gpu_mean_s",
                          "init": "engine_init_mean_s"}


@dataclass(frozen=True)
class Settings:
    """What one comparison runs."""

    policies: tuple[str, ...]
    seeds: tuple[int, ...]
    scenarios: dict[str, tuple[str, ...]]
    common: tuple[str, ...] = ()
    workers: int = 2
    targets: tuple[dict[str, Any], ...] = ()
    targets_on: tuple[str, ...] = ()  # scenarios the targets are judged on (empty: every scenario)
    notes: str = ""  # markdown placed after the report's introduction (what the tables mean; no numbers)
    config_path: str = ""

    def overrides(self, scenario: str, policy: str, seed: int) -> list[str]:
        """The hydra overrides of one run (as `python -m experiments.simulate` would take them)."""
        return [*self.common, *self.scenarios[scenario], f"policy={policy}", f"seed={seed}"]


@dataclass
class Run:
    """One simulation's numbers: the metrics, and every completed cold start (latency, source tier) for CDFs."""

    scenario: str
    policy: str
    seed: int
    metrics: dict[str, float | None]
    cold: list[tuple[float, str]] = field(default_factory=list)
    wall_s: float = 0.0


def scenario_overrides(name: str, value: Any, conf_dir: Path = Path(CONF_DIR)) -> tuple[str, ...]:
    """A scenario's overrides: its list, or `scenario=<name>` when it is null and the group has that option."""
    if value is None:
        if not (conf_dir / "scenario" / f"{name}.yaml").exists():
            raise ConfigError(f"scenarios.{name}: null means the conf/scenario group's {name!r}, which does not "
                              f"exist yet; give a list of overrides instead")
        return (f"scenario={name}",)
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"scenarios.{name}: expected a list of overrides or null, got {value!r}")
    return tuple(str(v) for v in value)


def load_settings(path: Path = DEFAULT_CONFIG, *, seeds: Sequence[int] | None = None,
                  policies: Sequence[str] | None = None, scenarios: Sequence[str] | None = None,
                  workers: int | None = None) -> Settings:
    """Read a compare config, restricted / overridden by the command line's choices."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    all_scen = raw.get("scenarios") or {}
    if not isinstance(all_scen, Mapping) or not all_scen:
        raise ConfigError(f"{path}: scenarios: at least one is needed")
    chosen = list(scenarios) if scenarios else list(all_scen)
    unknown = [s for s in chosen if s not in all_scen]
    if unknown:
        raise ConfigError(f"--scenario: unknown {unknown}; {path} has {sorted(all_scen)}")
    pols = tuple(policies or raw.get("policies") or ())
    seed_list = tuple(int(s) for s in (seeds if seeds is not None else raw.get("seeds") or ()))
    if not pols or not seed_list:
        raise ConfigError(f"{path}: policies and seeds must not be empty")
    missing = [p for p in pols if not (Path(CONF_DIR) / "policy" / f"{p}.yaml").exists()]
    if missing:
        raise ConfigError(f"policies: no conf/policy/<name>.yaml for {missing}")
    return Settings(
        policies=pols, seeds=seed_list,
        scenarios={s: scenario_overrides(s, all_scen[s]) for s in chosen},
        common=tuple(str(o) for o in raw.get("common") or ()),
        workers=int(workers if workers is not None else raw.get("workers", 2)),
        targets=tuple(raw.get("targets") or ()), targets_on=tuple(raw.get("targets_on") or ()),
        notes=str(raw.get("notes") or ""), config_path=str(path),
    )


def compose(overrides: Sequence[str]) -> dict[str, Any]:
    """The composed config as `python -m experiments.simulate <overrides>` sees it, quiet and without outputs."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain["progress"] = False
    plain["output"] = {"plots": False, "records": False}
    return plain


def _get(summary: Mapping[str, Any], path: Sequence[str]) -> float | None:
    cur: Any = summary
    for k in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(k)
    return None if cur is None else float(cur)


def metrics_of(summary: Mapping[str, Any]) -> dict[str, float | None]:
    """The compared numbers of one run's summary.json (counts by tier are 0 where a tier served none)."""
    out = {k: _get(summary, p) for k, (p, _, _) in METRICS.items()}
    by_tier = summary.get("cold_start_by_tier") or {}
    loads = summary.get("loads_by_tier") or {}
    for t in TIER_ORDER:
        tier = by_tier.get(t) or {}
        out[f"cold_{t}"] = float(tier.get("count", 0))
        out[f"loads_{t}"] = float(loads.get(t, 0))
        for key, summary_key in PHASES.items():
            out[f"{key}_{t}"] = None if tier.get(summary_key) is None else float(tier[summary_key])
    return out


def run_one(scenario: str, policy: str, seed: int, overrides: Sequence[str]) -> Run:
    """Compose and simulate one combination (in a worker process or here)."""
    from experiments.simulate import run as simulate_config

    t0 = time.perf_counter()
    res = simulate_config(compose(overrides), None)
    req = res.requests
    cold = req[req["cold_start"] & (req["outcome"] == "completed")]
    pairs = [(round(float(s), 6), str(t)) for s, t in zip(cold["cold_start_s"], cold["source_tier"], strict=True)
             if s == s]  # NaN-free
    return Run(scenario, policy, seed, metrics_of(res.summary), pairs, time.perf_counter() - t0)


def run_all(settings: Settings, *, progress: bool = True) -> list[Run]:
    """Every scenario x policy x seed, in `settings.workers` processes; the result is in a fixed order
    (scenario, policy, seed as configured) whatever order the runs finished in."""
    from tqdm import tqdm

    jobs = [(s, p, k, settings.overrides(s, p, k)) for s in settings.scenarios for p in settings.policies
            for k in settings.seeds]
    done: dict[tuple[str, str, int], Run] = {}
    bar = tqdm(total=len(jobs), desc="compare", unit="run", disable=not progress)
    if settings.workers <= 1:
        for job in jobs:
            done[job[:3]] = run_one(*job)
            bar.update()
    else:
        # spawn: a fresh interpreter per worker (no forked hydra / matplotlib state); each runs many jobs
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=settings.workers, mp_context=ctx) as pool:
            futures = {pool.submit(run_one, *job): job for job in jobs}
            for fut in as_completed(futures):
                done[futures[fut][:3]] = fut.result()
                bar.update()
    bar.close()
    return [done[j[:3]] for j in jobs]


def command(argv: Sequence[str]) -> str:
    """The command line that regenerates the report."""
    return shlex.join(["python", "-m", MODULE, *argv])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="compare config (conf/compare.yaml)")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder of policies.md and policies/ (docs)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the config's)")
    parser.add_argument("--policies", nargs="+", help="policies (default: the config's)")
    parser.add_argument("--scenario", action="append", help="run only this scenario (repeatable)")
    parser.add_argument("--workers", type=int, help="parallel processes (default: the config's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (`tierlab-compare`)."""
    from experiments.compare_report import one_line, write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        settings = load_settings(args.config, seeds=args.seeds, policies=args.policies, scenarios=args.scenario,
                                 workers=args.workers)
        runs = run_all(settings, progress=not args.no_progress)
        wall = time.perf_counter() - t0
        report = write_report(settings, runs, args.out, command=command(argv), wall_s=wall)
    except ConfigError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(one_line(settings, runs, report, wall))


if __name__ == "__main__":
    main()
