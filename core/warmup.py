"""The warm-up cut (`metrics.warmup_s`): which requests and which spans of time a summary counts.

Requests arriving before `warmup_s` are simulated but not measured: they bring the tiers and instances to a
working state, as a platform is when a measurement starts. Pure helpers over the record tables; the simulator's
counters at that instant are taken by `sim.warmup`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from core.errors import ConfigError
from core.workload.trace import Workload

FIELD = "metrics.warmup_s"


def check_warmup(value: object, wl: Workload) -> float:
    """`metrics.warmup_s` as seconds, once it is known to leave requests to measure: a warm-up as long as the
    trace (or longer, or past its last arrival) is a `ConfigError` naming the field, before any run."""
    try:
        w = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{FIELD}: expected seconds, got {value!r}") from None
    if not math.isfinite(w) or w < 0:
        raise ConfigError(f"{FIELD}: must be finite and >= 0, got {value!r}")
    if w == 0:
        return 0.0
    last = float(wl.arrival_s[-1]) if len(wl) else 0.0
    if w >= wl.duration_s or w > last:
        raise ConfigError(
            f"{FIELD}: {w:g} s is not shorter than the trace (workload {wl.name!r} spans {wl.duration_s:g} s, its "
            f"last request arrives at {last:g} s): no request would be measured; lower it (0: no warm-up)")
    return w


def measured_requests(requests: pd.DataFrame, warmup_s: float) -> pd.DataFrame:
    """The requests that arrived at or after `warmup_s` (the index renumbered from 0)."""
    return requests[requests["arrival_s"] >= warmup_s].reset_index(drop=True)


def clip_lifetimes(lifetimes: pd.DataFrame, start_s: float) -> pd.DataFrame:
    """Instance lifetimes (`core.cost.instance_lifetimes`) cut to what lies after `start_s`: instances that
    ended before are dropped, those alive then start at `start_s`."""
    if lifetimes.empty:
        return lifetimes
    out = lifetimes[lifetimes["stop_s"] > start_s].copy()
    out["start_s"] = out["start_s"].clip(lower=start_s)
    return out.reset_index(drop=True)


def clip_intervals(intervals: Sequence[tuple[float, float]], start_s: float) -> list[tuple[float, float]]:
    """[start, end) intervals cut to what lies after `start_s`."""
    return [(max(a, start_s), b) for a, b in intervals if b > start_s]
