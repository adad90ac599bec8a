"""Statistics of a policy comparison (pure: per-seed numbers in, estimates and verdicts out).

Every policy runs once per seed on every scenario, and a seed fixes the trace (arrivals, model assignment,
faults), so two policies' runs with the same seed see the same requests. The unit of replication is the seed:

- `mean_ci(values)`: the mean over seeds, with a percentile bootstrap interval over seeds (RESAMPLES
  resamples of the seeds with replacement, one fixed generator seed: the same numbers always give the same
  interval);
- `paired(a, b)`: the paired difference mean(a - b) and the ratio mean(a) / mean(b) of two policies on the
  same seeds, each with a bootstrap interval in which a resample draws the same seeds for both (so the
  seed-to-seed spread of the trace, which both policies share, cancels out). `verdict` says "no difference"
  when the interval contains 0 (ratio: 1), else which side is lower.

Seeds whose metric is undefined (a run with no cold start has no cold-start latency) are dropped from that
metric, pairwise for the paired statistics. With fewer than MIN_SEEDS seeds left there is no interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 4000
BOOT_SEED = 20261202
LEVEL = 0.95
#: an interval needs at least this many seeds (one seed has no spread to resample)
MIN_SEEDS = 2
SAME, LOWER, HIGHER, NA = "no difference", "lower", "higher", "n/a"


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap interval; `lo`/`hi` are None when there are too few seeds."""

    value: float | None
    lo: float | None
    hi: float | None
    n: int

    def text(self, digits: int = 3, unit: str = "") -> str:
        """e.g. "12.3 s [10.1, 14.0]" (significant digits), "n/a" without a value."""
        if self.value is None:
            return NA
        v = f"{_g(self.value, digits)}{unit}"
        if self.lo is None or self.hi is None:
            return v
        return f"{v} [{_g(self.lo, digits)}, {_g(self.hi, digits)}]"


@dataclass(frozen=True)
class Paired:
    """Policy a against policy b on the same seeds: difference a - b and ratio a / b, with verdicts."""

    diff: Estimate
    ratio: Estimate
    diff_verdict: str
    ratio_verdict: str


def _g(x: float, digits: int) -> str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def _clean(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _indices(n: int, resamples: int = RESAMPLES, seed: int = BOOT_SEED) -> np.ndarray:
    """(resamples, n) seed indices drawn with replacement; a fresh generator each call, so deterministic."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float | None, float | None]:
    s = samples[np.isfinite(samples)]
    if not s.size:
        return None, None
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(s, [tail, 100.0 - tail])
    return float(lo), float(hi)


def mean_ci(values: Sequence[float | None], *, resamples: int = RESAMPLES, seed: int = BOOT_SEED) -> Estimate:
    """The mean over seeds with a percentile bootstrap interval over seeds (undefined seeds dropped)."""
    x = _clean(values)
    x = x[np.isfinite(x)]
    if not x.size:
        return Estimate(None, None, None, 0)
    value = float(x.mean())
    if x.size < MIN_SEEDS:
        return Estimate(value, None, None, int(x.size))
    means = x[_indices(x.size, resamples, seed)].mean(axis=1)
    lo, hi = _interval(means)
    return Estimate(value, lo, hi, int(x.size))


def verdict(est: Estimate, null: float) -> str:
    """"no difference" if the interval holds `null`, else "lower" / "higher" (a relative to b)."""
    if est.value is None or est.lo is None or est.hi is None:
        return NA
    if est.lo <= null <= est.hi:
        return SAME
    return LOWER if est.hi < null else HIGHER


def paired(a: Sequence[float | None], b: Sequence[float | None], *, resamples: int = RESAMPLES,
           seed: int = BOOT_SEED) -> Paired:
    """Paired bootstrap of a against b: `a[k]` and `b[k]` are the same seed's runs of two policies.

    The ratio is of the means (mean(a) / mean(b) per resample), not a mean of per-seed ratios, so that one seed
    with a tiny denominator cannot dominate it; it is undefined (n/a) when b's mean is 0.
    """
    xa, xb = _clean(a), _clean(b)
    if xa.shape != xb.shape:
        raise ValueError(f"paired: {len(xa)} values against {len(xb)}; both policies need the same seeds")
    keep = np.isfinite(xa) & np.isfinite(xb)
    xa, xb = xa[keep], xb[keep]
    n = int(xa.size)
    if not n:
        empty = Estimate(None, None, None, 0)
        return Paired(empty, empty, NA, NA)
    d = float((xa - xb).mean())
    mb = float(xb.mean())
    r = float(xa.mean() / mb) if mb != 0 else None
    if n < MIN_SEEDS:
        de, re = Estimate(d, None, None, n), Estimate(r, None, None, n)
        return Paired(de, re, NA, NA)
    idx = _indices(n, resamples, seed)
    sa, sb = xa[idx].mean(axis=1), xb[idx].mean(axis=1)
    dlo, dhi = _interval(sa - sb)
    de = Estimate(d, dlo, dhi, n)
    if r is None:
        re = Estimate(None, None, None, n)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.where(sb != 0, sa / np.where(sb != 0, sb, 1.0), np.nan)
        rlo, rhi = _interval(ratios)
        re = Estimate(r, rlo, rhi, n)
    return Paired(de, re, verdict(de, 0.0), verdict(re, 1.0))


def judge_ratio(est: Estimate, limit: float, *, below: bool = True) -> str:
    """A target on a ratio: "met" when the whole interval is on the good side of `limit` (below it when
    `below`), "missed" when the whole interval is on the other side, "inside the noise" otherwise."""
    if est.value is None or est.lo is None or est.hi is None:
        return NA
    if below:
        return "met" if est.hi <= limit else "missed" if est.lo > limit else "inside the noise"
    return "met" if est.lo >= limit else "missed" if est.hi < limit else "inside the noise"
