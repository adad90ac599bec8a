"""The twin report's numbers pooled across seeds, each with a 95% bootstrap interval (pure: frames in, dicts out).

One policy x workload runs once per seed; `summarize(runs)` takes those runs (fidelity.json + twin.parquet each)
and returns every metric the report shows as an estimate {value, lo, hi, n, per_seed}:

- value: the statistic on the requests of all seeds pooled (a median |err| over every seed's errors, a TTFT p90
  over every seed's requests completed on both sides, cold starts per tier summed, the agreement share over all
  joined requests); requests lost on either side enter no error and no percentile, they are counted;
- lo, hi: a percentile bootstrap interval (2.5% and 97.5% of RESAMPLES resamples) over requests, stratified by
  seed: each resample draws, within every seed, as many requests as that seed has (with replacement) and pools
  them. Requests, not seeds, are resampled because 3 seeds give no usable interval on their own; requests of one
  run are not independent (a slow cold start delays the requests queued behind it), so the interval is, if
  anything, too narrow. numpy only, one fixed generator seed: the same runs always give the same interval;
- per_seed: the statistic on each seed alone, so the spread between seeds is visible too.

`judge(estimate, limit)` turns an estimate into "met" / "missed" / "inside the noise" (the interval straddles the
limit, or too few samples to tell).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from experiments.twin_join import METRICS, PHASES, decision_agrees

RESAMPLES = 2000
BOOT_SEED = 20261202
LEVEL = 0.95
#: below this many per-request errors a bootstrap interval is too optimistic to support met / missed
MIN_N = 5
#: run-level percentiles: (metric, quantile label)
PERCENTILES: tuple[tuple[str, str], ...] = (("ttft_s", "p50"), ("ttft_s", "p90"), ("tpot_s", "p50"))
MET, MISSED, NOISE, NA = "met", "missed", "inside the noise", "n/a"

Stat = Callable[[np.ndarray], np.ndarray]  # (resamples, requests, columns) -> (resamples,)


def _f(x: Any) -> float | None:
    """A finite float, inf kept (a count ratio over live 0), NaN and None as None (JSON-able)."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _block(rows: np.ndarray) -> np.ndarray:
    """rows as a 2-D float array (requests x columns), a 1-D one as one column."""
    a = np.asarray(rows, dtype=float)
    return a.reshape(len(a), -1) if a.ndim != 1 else a[:, None]


def estimate(per_seed: Sequence[np.ndarray], stat: Stat, n: int | None = None) -> dict[str, Any]:
    """{value, lo, hi, n, per_seed} of `stat` over the seeds' rows (`per_seed[k]`: requests x columns of seed k),
    the interval a stratified percentile bootstrap (module docstring)."""
    every = [_block(b) for b in per_seed]
    blocks = [b for b in every if len(b)]
    if not blocks:
        return {"value": None, "lo": None, "hi": None, "n": 0, "per_seed": [None] * len(per_seed)}
    pooled = np.concatenate(blocks)
    # a resample may hold no value on one side (all NaN): its statistic is NaN and dropped below, not a warning
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = _f(stat(pooled[None])[0])
        seeds = [_f(stat(b[None])[0]) if len(b) else None for b in every]
        rng = np.random.default_rng(BOOT_SEED)
        idx, offset = [], 0
        for b in blocks:  # within each seed, as many draws as it has requests
            idx.append(offset + rng.integers(0, len(b), size=(RESAMPLES, len(b))))
            offset += len(b)
        samples = stat(pooled[np.concatenate(idx, axis=1)])
    samples = samples[~np.isnan(samples)]
    lo = hi = None
    if samples.size:  # inverted_cdf: actual resample values, no interpolation towards an infinite one
        lo, hi = (float(q) for q in np.quantile(samples, [(1 - LEVEL) / 2, (1 + LEVEL) / 2], method="inverted_cdf"))
    return {"value": value, "lo": lo, "hi": hi, "n": int(len(pooled) if n is None else n), "per_seed": seeds}


def judge(est: Mapping[str, Any] | None, limit: float, *, at_least: bool = False, two_sided: bool = False,
          min_n: int = 0) -> str:
    """met if the whole interval is on the target's side of `limit`, missed if it is all on the other side, inside
    the noise if it straddles the limit (or n < min_n); n/a without a value. `two_sided`: a signed error whose
    magnitude must be <= limit; `at_least`: the value must be >= limit; otherwise <= limit."""
    if not est or est.get("value") is None:
        return NA
    if int(est.get("n") or 0) < min_n:
        return NOISE
    v = float(est["value"])
    lo = float(est["lo"]) if est.get("lo") is not None else v
    hi = float(est["hi"]) if est.get("hi") is not None else v
    if two_sided:
        good_lo, good_hi = -limit, limit
    elif at_least:
        good_lo, good_hi = limit, math.inf
    else:
        good_lo, good_hi = -math.inf, limit
    if good_lo <= lo and hi <= good_hi:
        return MET
    if hi < good_lo or lo > good_hi:
        return MISSED
    return NOISE


# --------------------------------------------------------------------------- statistics over resamples


def _abs_median(x: np.ndarray) -> np.ndarray:
    return np.median(np.abs(x[..., 0]), axis=-1)


def _abs_p90(x: np.ndarray) -> np.ndarray:
    return np.quantile(np.abs(x[..., 0]), 0.9, axis=-1)


def _median(x: np.ndarray) -> np.ndarray:
    return np.median(x[..., 0], axis=-1)


ERROR_STATS: dict[str, Stat] = {"median_abs_err": _abs_median, "p90_abs_err": _abs_p90, "bias": _median}


def _percentile_error(q: float) -> Stat:
    def stat(x: np.ndarray) -> np.ndarray:  # columns: live, sim (NaN where that side has no value)
        lv = np.nanquantile(x[..., 0], q, axis=-1)
        sv = np.nanquantile(x[..., 1], q, axis=-1)
        return np.where(lv > 0, (sv - lv) / lv, np.nan)
    return stat


def _tier_error(k: int, n_tiers: int) -> Stat:
    def stat(x: np.ndarray) -> np.ndarray:  # columns: live one-hot per tier, then sim one-hot per tier
        lv, sv = x[..., k].sum(axis=-1), x[..., n_tiers + k].sum(axis=-1)
        return np.where(lv > 0, np.abs(sv - lv) / np.where(lv > 0, lv, 1), np.where(sv > 0, np.inf, 0.0))
    return stat


def _mean(x: np.ndarray) -> np.ndarray:
    return x[..., 0].mean(axis=-1)


# --------------------------------------------------------------------------- one policy x workload


def _col(j: pd.DataFrame, name: str) -> np.ndarray:
    return j[name].astype(float).to_numpy() if name in j else np.full(len(j), np.nan)


def _errors(joins: Sequence[pd.DataFrame], metric: str) -> dict[str, dict[str, Any]]:
    per_seed = [e[np.isfinite(e)] for e in (_col(j, f"{metric}_rel_err") for j in joins)]
    return {name: estimate(per_seed, stat) for name, stat in ERROR_STATS.items()}


def _completed(j: pd.DataFrame) -> np.ndarray:
    """Rows completed on both sides: the requests whose percentiles are compared (a request lost live has no
    TTFT there, and keeping its sim TTFT would compare the sim's slowest requests with live's survivors)."""
    ok = j["in_live"].to_numpy(dtype=bool) & j["in_sim"].to_numpy(dtype=bool)
    for world in ("live", "sim"):
        if f"outcome_{world}" in j:
            ok &= (j[f"outcome_{world}"] == "completed").fillna(False).to_numpy(dtype=bool)
    return ok


def _side_values(j: pd.DataFrame, metric: str, world: str) -> np.ndarray:
    v = _col(j, f"{metric}_{world}")
    return np.where(_completed(j) & np.isfinite(v), v, np.nan)


def _tiers(j: pd.DataFrame, world: str) -> np.ndarray:
    """Each row's source tier on `world`'s side where that side cold-started it ("" otherwise)."""
    cold = j[f"cold_start_{world}"].astype("boolean").fillna(False).to_numpy(dtype=bool) if \
        f"cold_start_{world}" in j else np.zeros(len(j), dtype=bool)
    tier = j[f"source_tier_{world}"].fillna("").astype(str).to_numpy() if f"source_tier_{world}" in j else \
        np.full(len(j), "")
    return np.where(j[f"in_{world}"].to_numpy(dtype=bool) & cold, tier, "")


def summarize(runs: Sequence[tuple[Mapping[str, Any], pd.DataFrame]]) -> dict[str, Any]:
    """One policy x workload's report entry from its runs (one (fidelity.json dict, twin.parquet frame) per seed):
    request counts summed, and every metric pooled across seeds with its interval (module docstring)."""
    fids = [f for f, _ in runs]
    joins = [j for _, j in runs]
    first = fids[0]
    out: dict[str, Any] = {
        "policy": first.get("policy"), "workload": first.get("report_workload") or first.get("workload"),
        "seeds": [f.get("seed") for f in fids],
        "requests": {k: sum(int(f["requests"][k]) for f in fids) for k in ("live", "sim", "joined")},
        "live_wall_s": [_f(f.get("live_wall_s")) for f in fids],
    }
    out["requests"]["lost_live"] = sum(len(f["requests"].get("lost_live") or {}) +
                                       len(f["requests"].get("missing_live") or []) for f in fids)
    out["metrics"] = {m: _errors(joins, m) for m in METRICS}
    out["phases"] = {p: _errors(joins, p) for p in PHASES}
    out["percentiles"] = {}
    n_done = sum(int(_completed(j).sum()) for j in joins)
    for metric, q in PERCENTILES:
        blocks = [np.column_stack([_side_values(j, metric, "live"), _side_values(j, metric, "sim")]) for j in joins]
        pooled = np.concatenate(blocks)
        frac = int(q[1:]) / 100
        live, sim = (np.nanquantile(pooled[:, c], frac) if np.isfinite(pooled[:, c]).any() else None for c in (0, 1))
        out["percentiles"].setdefault(metric, {})[q] = {
            "live": _f(live), "sim": _f(sim), "rel_err": estimate(blocks, _percentile_error(frac), n=n_done)}
    tiers_live = [_tiers(j, "live") for j in joins]
    tiers_sim = [_tiers(j, "sim") for j in joins]
    names = sorted({t for a in (*tiers_live, *tiers_sim) for t in a if t})
    onehot = [np.column_stack([*(lv == t for t in names), *(sv == t for t in names)]).astype(float)
              if names else np.zeros((len(lv), 0)) for lv, sv in zip(tiers_live, tiers_sim, strict=True)]
    out["tiers"] = {"live": {t: int(sum((a == t).sum() for a in tiers_live)) for t in names},
                    "sim": {t: int(sum((a == t).sum() for a in tiers_sim)) for t in names},
                    "rel_err": {t: estimate(onehot, _tier_error(k, len(names))) for k, t in enumerate(names)}}
    agree = [decision_agrees(j).astype(float) for j in joins]
    out["agreement"] = estimate(agree, _mean)
    out["first_divergence"] = [{"seed": f.get("seed"), **f["first_divergence"]} for f in fids
                               if f.get("first_divergence")]
    out["run"] = _run_counts(fids)
    return out


def _run_counts(fids: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Instances started, tier copies and evictions per seed's run, each side (None before runs recorded them)."""
    runs = [f.get("run") for f in fids]
    if not all(runs):
        return None
    return {k: {side: [int(r[k][side]) for r in runs] for side in ("live", "sim")}
            for k in ("instances_started", "tier_copies", "evictions")}
