"""Summary metrics over the record tables; the keys of summary.json."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from core.specs import TIER_ORDER


def _q(values: pd.Series | np.ndarray, q: float) -> float | None:
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(np.quantile(arr, q)) if arr.size else None


def _mean(values: pd.Series | np.ndarray) -> float | None:
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else None


def summarize(
    requests: pd.DataFrame,
    *,
    gpu_hours: float,
    cost_usd: float,
    cost_breakdown: dict[str, float],
    memory_waste_frac: float,
    sim_s: float,
    wall_s: float,
    ttft_slo_s: float,
    extra: dict[str, Any] | None = None,
    memory_waste_parts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's headline numbers. `slo_attainment` is the share of all requests completed within the TTFT SLO.
    `memory_waste_parts`: `core.memory_waste.waste_parts` of the run (None where the world does not account them,
    as live does not yet)."""
    n = len(requests)
    outcome = requests["outcome"]
    completed = requests[outcome == "completed"]
    cold = requests[requests["cold_start"] & (outcome == "completed")]
    by_tier: dict[str, dict[str, float | int | None]] = {}
    for tier in TIER_ORDER:
        sel = cold[cold["source_tier"] == tier]
        if len(sel):
            # the load phases these requests waited on (a request placed mid-load waited on part of them)
            by_tier[tier] = {"count": len(sel), "mean_s": _mean(sel["cold_start_s"]),
                             "p99_s": _q(sel["cold_start_s"], 0.99), "fetch_mean_s": _mean(sel["fetch_s"]),
                             "to_gpu_mean_s": _mean(sel["to_gpu_s"]),
                             "engine_init_mean_s": _mean(sel["engine_init_s"])}
    reasons = requests.loc[outcome != "completed", "reason"].value_counts()
    summary: dict[str, Any] = {
        "requests": int(n),
        "completed": int((outcome == "completed").sum()),
        "rejected": int((outcome == "rejected").sum()),
        "failed": int((outcome == "failed").sum()),
        "reasons": {str(k): int(v) for k, v in reasons.items()},
        "cold_starts": int(requests["cold_start"].sum()),
        "cold_start_s": {
            "mean": _mean(cold["cold_start_s"]),
            "p50": _q(cold["cold_start_s"], 0.5),
            "p90": _q(cold["cold_start_s"], 0.9),
            "p99": _q(cold["cold_start_s"], 0.99),
        },
        "cold_start_by_tier": by_tier,
        "ttft_s": {"p50": _q(completed["ttft_s"], 0.5), "p99": _q(completed["ttft_s"], 0.99),
                   "mean": _mean(completed["ttft_s"])},
        "tpot_s": {"p50": _q(completed["tpot_s"], 0.5), "p99": _q(completed["tpot_s"], 0.99)},
        "e2e_s": {"p50": _q(completed["e2e_s"], 0.5), "p99": _q(completed["e2e_s"], 0.99)},
        "slo_attainment": float((completed["ttft_s"] <= ttft_slo_s).sum() / n) if n else None,
        "ttft_slo_s": ttft_slo_s,
        "gpu_hours": gpu_hours,
        "cost_usd": cost_usd,
        "cost_breakdown_usd": cost_breakdown,
        "cost_per_1k_tokens_usd": (
            cost_usd / (completed["prompt_tokens"].sum() + completed["output_tokens"].sum()) * 1000
            if len(completed) else None),
        "memory_waste_frac": memory_waste_frac,
        "memory_waste_parts": memory_waste_parts,
        "sim_s": sim_s,
        "wall_s": wall_s,
        "requests_per_wall_s": n / wall_s if wall_s > 0 else None,
    }
    if extra:
        summary.update(extra)
    return _clean(summary)


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become None, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


#: Rejections caused by the request itself (a model nobody serves, a context no engine can hold; in live mode
#: also what the gateway refuses before any engine is involved: bad or oversized bodies, unknown parameters,
#: keys, models, and a tenant over its own rate limit or quota; and an engine's own 4xx answer), not by the
#: service: they do not count against availability.
REQUEST_CAUSED_REASONS: frozenset[str] = frozenset({
    "unknown_model", "kv_cache_too_small",
    "invalid_json", "invalid_content_length", "request_too_large", "missing_required_parameter", "invalid_value",
    "invalid_type", "invalid_model_name", "unsupported_parameter", "context_length_exceeded", "invalid_api_key",
    "model_not_found", "model_not_allowed", "rate_limit_exceeded", "insufficient_quota", "exceeds_token_quota",
    "engine_400", "engine_404", "engine_413", "engine_422",
})


def union_length_s(intervals: Sequence[tuple[float, float]]) -> float:
    """Total time covered by the union of [start, end) intervals."""
    total = 0.0
    cur_start = cur_end = None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def availability(
    requests: pd.DataFrame, *, no_path_intervals: Sequence[tuple[float, float]], recoveries_s: Sequence[float],
) -> dict[str, Any]:
    """Availability of the service over a run.

    - `availability`: completed / (requests - requests rejected for reasons of their own,
      `REQUEST_CAUSED_REASONS`). Every other request that did not complete (queue timeouts, failures,
      unfinished at the end) counts as unavailability, whatever caused it: overload as well as faults.
    - `unavailable_s`: seconds during which no model could be started from scratch: no object store
      served cloud fetches (a store out and the failover not done yet, or every store out) or no node
      was up. Models already resident or cached on a node may still have been served then.
    - `failover_recovery_s`: for each loss of the store serving cloud fetches that ended within the run,
      the time until a store served again (`failover_s` when a backup was up; longer when none was).
    """
    n = len(requests)
    own = requests["outcome"].eq("rejected") & requests["reason"].isin(REQUEST_CAUSED_REASONS)
    eligible = n - int(own.sum())
    completed = int((requests["outcome"] == "completed").sum())
    rec = np.asarray(recoveries_s, dtype=float)
    return {
        "availability": completed / eligible if eligible else None,
        "unavailable_s": union_length_s(no_path_intervals),
        "failover_recovery_s": {"count": int(rec.size), "mean": _mean(rec), "p50": _q(rec, 0.5),
                                "max": float(rec.max()) if rec.size else None},
    }


def prefix_cache_stats(requests: pd.DataFrame) -> dict[str, Any]:
    """Prefix (KV) cache use over the completed requests: `prefix_hit_rate` is token-weighted (prompt tokens
    served from an instance's prefix cache over all prompt tokens), `prefix_hit_requests` the share of requests
    with any cached token, `cached_tokens` the total. None / 0 without completed requests."""
    done = requests[requests["outcome"] == "completed"]
    cached = int(done["cached_tokens"].sum()) if "cached_tokens" in done else 0
    prompt = int(done["prompt_tokens"].sum())
    return {
        "prefix_hit_rate": cached / prompt if prompt else None,
        "prefix_hit_requests": float((done["cached_tokens"] > 0).mean()) if len(done) and "cached_tokens" in done
        else None,
        "cached_tokens": cached,
    }


def memory_waste_frac(reserved_byte_s: float, weights_byte_s: float, kv_byte_s: float) -> float:
    """Share of reserved GPU memory-time that held neither weights nor live KV cache."""
    if reserved_byte_s <= 0:
        return 0.0
    return max(0.0, 1.0 - (weights_byte_s + kv_byte_s) / reserved_byte_s)
