"""Gather a hydra sweep's outputs into one tidy table: one row per job, its overrides as columns.

`python -m experiments.gather multirun/<dir> [--plot] [--records] [--allow-missing]` reads every
job's `summary.json` and `.hydra/overrides.yaml`, writes `sweep.parquet` into the sweep dir, prints
a compact table and a one-line summary; `--plot` draws `sweep.png`, `--records` also writes every
request of every job (records.parquet with the override columns) as `sweep_records.parquet`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from core.records import write_table

SUMMARY = "summary.json"
OVERRIDES = Path(".hydra") / "overrides.yaml"
SWEEP_TABLE = "sweep.parquet"
RECORDS_TABLE = "sweep_records.parquet"
SWEEP_PLOT = "sweep.png"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

#: Metric columns placed first, in this order (the rest follow alphabetically).
HEADLINE: tuple[str, ...] = (
    "requests", "completed", "rejected", "failed", "cold_starts",
    "cold_start_s.mean", "cold_start_s.p50", "cold_start_s.p99", "ttft_s.p50", "ttft_s.p99",
    "slo_attainment", "availability", "cost_usd", "cost_breakdown_usd.gpu", "cost_breakdown_usd.egress",
    "spot_nodes", "preemptions",
)
#: Summary maps keyed by category (tier, reason, store): a key a job lacks means zero there.
ZERO_WHEN_ABSENT: tuple[str, ...] = (
    "reasons.", "loads_by_tier.", "requeued_by_cause.", "cloud_gb_by_store.", "cost_breakdown_usd.")
ZERO_WHEN_ABSENT_SUFFIX = ".count"  # counts in per-category stats (cold_start_by_tier.<tier>.count)
#: What the compact printed table shows after the overrides that vary.
SHOWN: tuple[str, ...] = ("completed", "rejected", "failed", "cold_start_s.mean", "cold_start_s.p99",
                          "ttft_s.p99", "slo_attainment", "cost_usd")


class GatherError(ValueError):
    """A sweep dir cannot be gathered; the message names the dir or file at fault."""


@dataclass(frozen=True)
class Job:
    """One job dir of a sweep: its number, its dir and its overrides (parsed values and their text)."""

    num: int
    path: Path
    overrides: dict[str, Any]
    override_texts: dict[str, str]


def gather(sweep_dir: str | Path, *, allow_missing: bool = False, write: bool = True) -> pd.DataFrame:
    """One row per job of the sweep in `sweep_dir`: `job_num`, `job` (its dir), one column per override
    key (`policy`, `tiers`, `cluster.spot_share`, ...) and the job's summary.json flattened with dots
    (`cold_start_s.p99`, `cost_breakdown_usd.gpu`; a summary key equal to an override key becomes
    `summary.<key>`). Writes `sweep.parquet` into `sweep_dir` (atomically) unless `write` is false.

    A job without summary.json is an error naming its dir, or, with `allow_missing`, skipped with a
    warning and listed in `df.attrs["missing_jobs"]`.
    """
    root = Path(sweep_dir)
    jobs = sweep_jobs(root)
    override_keys = set(_override_columns(jobs))
    rows: list[dict[str, Any]] = []
    kept: list[Job] = []
    missing: list[str] = []
    for job in jobs:
        summary_path = job.path / SUMMARY
        if not summary_path.is_file():
            missing.append(_missing(job, summary_path, allow_missing))
            continue
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError) as exc:
            raise GatherError(f"{summary_path}: not a readable JSON summary ({exc})") from None
        if not isinstance(summary, Mapping):
            raise GatherError(f"{summary_path}: expected a JSON object")
        metrics = {(f"summary.{k}" if k in override_keys else k): v for k, v in _flatten(summary)}
        rows.append({"job_num": job.num, "job": _rel(job, root), **metrics})
        kept.append(job)
    if not rows:
        raise GatherError(f"{root}: none of its {len(jobs)} job(s) has a {SUMMARY}")
    _fill_absent_counts(rows)
    df = pd.DataFrame(rows)
    override_cols = _override_columns(kept)
    for col in override_cols:
        df[col] = _tidy_override(kept, col)
    metric_cols = [c for c in df.columns if c not in override_cols and c not in ("job_num", "job")]
    for col in metric_cols:
        if df[col].dtype == object and all(v is None or _is_number(v) for v in df[col]):
            df[col] = df[col].astype("float64")  # a statistic that is null in every job (no failovers)
    ordered = [c for c in HEADLINE if c in metric_cols]
    ordered += sorted(c for c in metric_cols if c not in ordered)
    df = df[["job_num", "job", *override_cols, *ordered]].reset_index(drop=True)
    df.attrs["override_columns"] = override_cols
    df.attrs["missing_jobs"] = missing
    if write:
        write_table(root / SWEEP_TABLE, df)
    return df


def gather_records(sweep_dir: str | Path, *, allow_missing: bool = False, columns: Sequence[str] | None = None,
                   write: bool = True) -> pd.DataFrame:
    """Every request of every job (records.parquet, all or `columns`) with `job_num`, `job` and the
    override columns in front: the per-request long table of the sweep. Writes `sweep_records.parquet`
    into `sweep_dir` unless `write` is false. Missing records are handled as in `gather`."""
    root = Path(sweep_dir)
    jobs = sweep_jobs(root)
    frames: list[pd.DataFrame] = []
    kept: list[Job] = []
    missing: list[str] = []
    for job in jobs:
        path = job.path / "records.parquet"
        if not path.is_file():
            missing.append(_missing(job, path, allow_missing))
            continue
        try:
            frames.append(pd.read_parquet(path, columns=list(columns) if columns is not None else None))
        except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
            raise GatherError(f"{path}: cannot read ({exc})") from None
        kept.append(job)
    if not frames:
        raise GatherError(f"{root}: none of its {len(jobs)} job(s) has a records.parquet")
    override_cols = _override_columns(kept)
    values = {c: _tidy_override(kept, c) for c in override_cols}
    parts = []
    for i, (job, frame) in enumerate(zip(kept, frames, strict=True)):
        front = {"job_num": job.num, "job": _rel(job, root), **{c: values[c][i] for c in override_cols}}
        parts.append(frame.assign(**front)[[*front, *frame.columns]])
    df = pd.concat(parts, ignore_index=True)
    df.attrs["override_columns"] = override_cols
    df.attrs["missing_jobs"] = missing
    if write:
        write_table(root / RECORDS_TABLE, df)
    return df


def sweep_jobs(sweep_dir: Path) -> list[Job]:
    """The job dirs under `sweep_dir` (those holding `.hydra/overrides.yaml`), by job number.

    Checks them against the sweep's own `multirun.yaml` where the basic sweeper ran it: a job that
    never started, or one left from an earlier sweep into the same dir, is an error naming it.
    """
    if not sweep_dir.is_dir():
        raise GatherError(f"{sweep_dir}: no such sweep dir")
    jobs = []
    for ov in sorted(sweep_dir.rglob("overrides.yaml")):
        job_dir = ov.parent.parent
        if ov.parent.name != ".hydra" or job_dir == sweep_dir:
            continue
        jobs.append(_read_job(job_dir))
    if not jobs:
        raise GatherError(f"{sweep_dir}: no job dirs (subdirectories with {OVERRIDES.as_posix()}); "
                          "is it the output dir of a `--multirun` sweep?")
    jobs.sort(key=lambda j: j.num)
    nums = [j.num for j in jobs]
    if len(set(nums)) != len(nums):
        dup = sorted({j.path.name for j in jobs if nums.count(j.num) > 1})
        raise GatherError(f"{sweep_dir}: several job dirs share a job number: {dup}")
    expected = expected_jobs(sweep_dir)
    if expected is not None:
        extra = [j.path.name for j in jobs if j.num >= expected]
        if extra:
            raise GatherError(f"{sweep_dir}: multirun.yaml expands to {expected} jobs, but job dirs {extra} are not "
                              "among them (left from an earlier sweep into the same dir? use a fresh hydra.sweep.dir)")
        absent = sorted(set(range(expected)) - set(nums))
        if absent:
            raise GatherError(f"{sweep_dir}: multirun.yaml expands to {expected} jobs; job number(s) {absent} "
                              "have no job dir (never started?)")
    return jobs


def expected_jobs(sweep_dir: Path) -> int | None:
    """How many jobs the sweep recorded in `sweep_dir/multirun.yaml` has, or None when that cannot be
    told here (no multirun.yaml, a sweeper other than hydra's basic one, a glob or interval sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    try:
        hydra_cfg = (_load_yaml(path) or {}).get("hydra") or {}
        sweeper = hydra_cfg.get("sweeper") or {}
        if sweeper.get("_target_") != BASIC_SWEEPER:
            return None
        # the basic sweeper's own rule: sweeper params first, command-line overrides win on the same key
        texts = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        texts += list((hydra_cfg.get("overrides") or {}).get("task") or [])
        by_key = {(o.key_or_group, o.package): o for o in OverridesParser.create().parse_overrides(texts)}
        n = 1
        for o in by_key.values():
            if o.is_sweep_override():
                n *= sum(1 for _ in o.sweep_string_iterator())
        return n
    except (HydraException, AttributeError, TypeError):
        return None  # expansions only the sweeper can do (glob over a config group, intervals)


def _read_job(job_dir: Path) -> Job:
    """A job's number (from .hydra/hydra.yaml) and overrides (from .hydra/overrides.yaml)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    ov_path = job_dir / OVERRIDES
    texts = _load_yaml(ov_path)
    if texts is None:
        texts = []
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise GatherError(f"{ov_path}: expected a list of override strings")
    try:
        parsed = OverridesParser.create().parse_overrides(texts)
    except HydraException as exc:
        raise GatherError(f"{ov_path}: {exc}") from None
    overrides: dict[str, Any] = {}
    override_texts: dict[str, str] = {}
    for o in parsed:
        key = o.key_or_group if o.package is None else f"{o.key_or_group}@{o.package}"
        value = None if o.is_delete() else o.value()
        overrides[key] = value
        # lists and dicts go into the table as their override text ("[0,900]")
        override_texts[key] = "" if value is None else o.get_value_element_as_str()
    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
    num = ((_load_yaml(hydra_yaml) or {}).get("hydra") or {}).get("job", {}).get("num") \
        if hydra_yaml.is_file() else None
    if not isinstance(num, int):
        raise GatherError(f"{hydra_yaml}: no hydra.job.num (not a job of a --multirun sweep?)")
    return Job(num, job_dir, overrides, override_texts)


def _load_yaml(path: Path) -> Any:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # hydra.yaml is read once per job: the C loader
    try:
        return yaml.load(path.read_text(), Loader=loader)
    except (OSError, yaml.YAMLError) as exc:
        raise GatherError(f"{path}: cannot read ({exc})") from None


def _rel(job: Job, root: Path) -> str:
    return job.path.relative_to(root).as_posix()


def _missing(job: Job, path: Path, allow_missing: bool) -> str:
    if not allow_missing:
        raise GatherError(f"job {job.num} ({job.path}): no {path.name} (the run failed or is still running; "
                          "--allow-missing skips such jobs)")
    warnings.warn(f"skipping job {job.num} ({job.path}): no {path.name}", stacklevel=3)
    return str(job.path)


def _fill_absent_counts(rows: list[dict[str, Any]]) -> None:
    """Give every row the per-category counts and amounts some other row has, as zero (same type)."""
    keys = {k for r in rows for k in r if k.startswith(ZERO_WHEN_ABSENT) or
            (k.startswith("cold_start_by_tier.") and k.endswith(ZERO_WHEN_ABSENT_SUFFIX))}
    for key in keys:
        zero = 0.0 if any(isinstance(r.get(key), float) for r in rows) else 0
        for r in rows:
            r.setdefault(key, zero)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            yield f"{prefix}{key}", json.dumps(value)
        else:
            yield f"{prefix}{key}", value


def _override_columns(jobs: Sequence[Job]) -> list[str]:
    """Override keys in the order the jobs give them."""
    return list(dict.fromkeys(k for j in jobs for k in j.overrides))


def _tidy_override(jobs: Sequence[Job], key: str) -> list[Any]:
    """One override's values over the jobs, of one parquet type: numbers stay numbers (ints and floats
    mixed become floats), one scalar type stays itself, anything else becomes the override text."""
    values = [j.overrides.get(key) for j in jobs]
    kinds = {type(v) for v in values if v is not None}
    if kinds and kinds <= {int, float}:
        return [math.nan if v is None else (float(v) if float in kinds else v) for v in values]
    if len(kinds) == 1 and kinds <= {bool, str}:
        return values
    return [j.override_texts.get(key) if key in j.overrides else None for j in jobs]


def varying(df: pd.DataFrame) -> list[str]:
    """The override columns whose value differs between jobs: the sweep's dimensions."""
    cols = df.attrs.get("override_columns") or []
    return [c for c in cols if df[c].astype("string").nunique(dropna=False) > 1]


def one_line(df: pd.DataFrame, table_path: Path) -> str:
    """e.g. "gathered 18 jobs (policy 3 x tiers 3 x cluster.spot_share 2) into .../sweep.parquet, 64 columns"."""
    dims = " x ".join(f"{c} {df[c].astype('string').nunique(dropna=False)}" for c in varying(df)) or "no sweep"
    skipped = df.attrs.get("missing_jobs") or []
    skipped_txt = f"; skipped {len(skipped)} job(s) without outputs" if skipped else ""
    best = ""
    if "cold_start_s.mean" in df and df["cold_start_s.mean"].notna().any():
        row = df.loc[df["cold_start_s.mean"].idxmin()]
        label = ",".join(f"{c}={row[c]}" for c in varying(df)) or row["job"]
        best = f"; lowest mean cold start {row['cold_start_s.mean']:.1f} s ({label})"
    return (f"gathered {len(df)} jobs ({dims}) into {table_path}, {df.shape[1]} columns"
            f"{best}{skipped_txt}")


def compact(df: pd.DataFrame) -> str:
    """The table to print: job number, the overrides that vary and a few headline metrics."""
    cols = ["job_num", *varying(df), *(c for c in SHOWN if c in df)]
    return df[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: gather a sweep dir into sweep.parquet, print it compactly; `--plot`, `--records`."""
    ap = argparse.ArgumentParser(prog="python -m experiments.gather", description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path, help="a hydra --multirun output dir (hydra.sweep.dir)")
    ap.add_argument("--allow-missing", action="store_true", help="skip jobs without outputs (default: fail)")
    ap.add_argument("--plot", action="store_true", help=f"draw {SWEEP_PLOT} (cost vs mean cold start)")
    ap.add_argument("--records", action="store_true", help=f"also write {RECORDS_TABLE} (one row per request)")
    args = ap.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skipped jobs are reported on stderr below
            df = gather(args.sweep_dir, allow_missing=args.allow_missing)
            records = gather_records(args.sweep_dir, allow_missing=args.allow_missing) if args.records else None
    except GatherError as exc:
        print(f"tierlab: error: {exc}", file=sys.stderr)
        return 2
    for job in df.attrs["missing_jobs"]:
        print(f"tierlab: skipped {job}: no {SUMMARY}", file=sys.stderr)
    print(compact(df))
    if records is not None:
        for job in records.attrs["missing_jobs"]:
            print(f"tierlab: skipped {job}: no records.parquet", file=sys.stderr)
        print(f"{len(records)} requests into {args.sweep_dir / RECORDS_TABLE}")
    if args.plot:
        from experiments.plots import sweep_scatter

        path = sweep_scatter(df, args.sweep_dir / SWEEP_PLOT)
        print(f"figure in {path}")
    print(one_line(df, args.sweep_dir / SWEEP_TABLE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
