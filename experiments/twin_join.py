"""The twin's join and fidelity metrics (pure: frames in, frames and dicts out).

Live and sim request tables (REQUEST_SCHEMA) are joined by `request_id` (row i of the trace is request i in
both worlds). A request missing on one side is kept in the join (outer join, `in_live` / `in_sim` flags),
counted and listed, never silently dropped. Relative error per request = (sim - live) / live; a metric's
fidelity is {median_abs_err, p90_abs_err, bias (median signed error), n} over the joined requests both sides
completed, with a finite value on each side, live's > 0 and the larger of the two at least the column's
`REL_ERR_FLOOR_S` (a relative error between two sub-millisecond queue times is noise, not fidelity), plus
`abs_err_s` {median, p90} of |sim - live| in seconds over the same requests without the floor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

#: the end-to-end metrics fidelity.json reports at its top level
METRICS: tuple[str, ...] = ("cold_start_s", "ttft_s", "tpot_s", "e2e_s")
#: per-request phases compared where both sides record them (REQUEST_SCHEMA's duration columns)
PHASES: tuple[str, ...] = ("queue_s", "fetch_s", "to_gpu_s", "engine_init_s", "cold_start_s", "prefill_s")
#: the decision columns compared by `decision_agreement`
DECISION: tuple[str, ...] = ("cold_start", "node", "source_tier")
#: below this (seconds, on both sides) a column's relative error is undefined: the gateway's queue_s is the
#: policy's compute time when nothing waits (0.02-0.3 ms live, exactly 0 in the simulator)
REL_ERR_FLOOR_S: dict[str, float] = {"queue_s": 0.01}
#: columns carried from each side into twin.parquet (suffixed _live / _sim)
CARRIED: tuple[str, ...] = ("model", "arrival_s", "outcome", "reason", "cold_start", "source_tier", "node",
                            "prompt_tokens", "output_tokens", *sorted(set(METRICS) | set(PHASES)))


def node_index(name: Any) -> int | None:
    """A node's ordinal from its name's trailing digits ("n1" live, "calibrated-1" sim -> 1); None if unnamed."""
    m = re.search(r"(\d+)$", str(name or ""))
    return int(m.group(1)) if m else None


def join(live: pd.DataFrame, sim: pd.DataFrame) -> pd.DataFrame:
    """One row per request id seen on either side: `<col>_live`, `<col>_sim`, `in_live`, `in_sim`, and for every
    metric and phase its relative error `<col>_rel_err` (NaN where either side lacks it, did not complete the
    request, or live's is 0)."""
    def side(df: pd.DataFrame, suffix: str) -> pd.DataFrame:
        cols = [c for c in CARRIED if c in df.columns]
        out = df.set_index("request_id")[cols].add_suffix(suffix)
        out[f"in{suffix}"] = True
        return out

    j = side(live, "_live").join(side(sim, "_sim"), how="outer").sort_index()
    for flag in ("in_live", "in_sim"):
        j[flag] = j[flag].astype("boolean").fillna(False).astype(bool)
    # a request lost on either side (timed out, failed, rejected) has no error: its e2e is when the client gave
    # up, not a latency the other world could match
    completed = np.ones(len(j), dtype=bool)
    for suffix in ("_live", "_sim"):
        if f"outcome{suffix}" in j:
            completed &= (j[f"outcome{suffix}"] == "completed").fillna(False).to_numpy(dtype=bool)
    for c in sorted(set(METRICS) | set(PHASES)):
        if f"{c}_live" in j and f"{c}_sim" in j:
            lv = j[f"{c}_live"].astype(float).to_numpy()
            sv = j[f"{c}_sim"].astype(float).to_numpy()
            valid = completed & np.isfinite(lv) & np.isfinite(sv)
            big = np.maximum(np.where(valid, lv, 0.0), np.where(valid, sv, 0.0)) >= REL_ERR_FLOOR_S.get(c, 0.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                j[f"{c}_rel_err"] = np.where(valid & (lv > 0) & big, (sv - lv) / lv, np.nan)
            j[f"{c}_abs_err_s"] = np.where(valid, np.abs(sv - lv), np.nan)
    j.index.name = "request_id"
    return j.reset_index()


def error_stats(rel_err: Sequence[float] | np.ndarray,
                abs_err_s: Sequence[float] | np.ndarray | None = None) -> dict[str, Any]:
    """{median_abs_err, p90_abs_err, bias, n} of relative errors (NaNs ignored; None when there are none), and
    with `abs_err_s` also {abs_err_s: {median, p90, n}} of the absolute errors in seconds."""
    e = np.asarray(rel_err, dtype=float)
    e = e[np.isfinite(e)]
    out: dict[str, Any] = {"median_abs_err": None, "p90_abs_err": None, "bias": None, "n": 0}
    if e.size:
        a = np.abs(e)
        out = {"median_abs_err": float(np.median(a)), "p90_abs_err": float(np.quantile(a, 0.9)),
               "bias": float(np.median(e)), "n": int(e.size)}
    if abs_err_s is not None:
        d = np.asarray(abs_err_s, dtype=float)
        d = d[np.isfinite(d)]
        out["abs_err_s"] = ({"median": float(np.median(d)), "p90": float(np.quantile(d, 0.9)), "n": int(d.size)}
                            if d.size else {"median": None, "p90": None, "n": 0})
    return out


def _same(a: Any, b: Any, col: str) -> bool:
    if col == "node":
        return node_index(a) == node_index(b)
    if col == "cold_start":
        return bool(a) == bool(b)
    return str(a) == str(b)


def decided(joined: pd.DataFrame) -> pd.DataFrame:
    """The joined requests whose decision is known on both sides: present in both, and live placed them (a
    request the client gave up on before the gateway's response headers has no gateway row, so no node or
    source tier: counting it as a disagreement would blame the simulator for a lost request)."""
    both = joined["in_live"] & joined["in_sim"]
    if "node_live" in joined:
        both &= joined["node_live"].fillna("").astype(str) != ""
    return joined[both]


def decisions(joined: pd.DataFrame) -> tuple[float | None, dict[str, Any] | None]:
    """Share of the `decided` requests whose cold/warm, node (by ordinal) and source tier agree, and the first
    divergence (lowest request id) with both decisions; (None, None) when there are none."""
    both = decided(joined)
    if not len(both):
        return None, None
    agree = 0
    first: dict[str, Any] | None = None
    for _, r in both.iterrows():
        ok = all(_same(r[f"{c}_live"], r[f"{c}_sim"], c) for c in DECISION)
        agree += ok
        if not ok and first is None:
            first = {"request_id": int(r["request_id"]), "model": str(r["model_live"]),
                     "live": {c: _plain(r[f"{c}_live"]) for c in DECISION},
                     "sim": {c: _plain(r[f"{c}_sim"]) for c in DECISION}}
    return agree / len(both), first


def decision_agrees(joined: pd.DataFrame) -> np.ndarray:
    """Per `decided` request (in join order): whether its cold/warm, node (by ordinal) and source tier agree;
    the per-request form of `decisions`, for intervals over requests."""
    both = decided(joined)
    return np.array([all(_same(r[f"{c}_live"], r[f"{c}_sim"], c) for c in DECISION) for _, r in both.iterrows()],
                    dtype=bool)


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def cold_starts_by_tier(df: pd.DataFrame) -> dict[str, int]:
    """Cold starts per source tier of one side's records."""
    cold = df[df["cold_start"].astype(bool)]
    return {str(k): int(v) for k, v in cold["source_tier"].value_counts().sort_index().items()}


def run_counts(instances: pd.DataFrame | None, moves: pd.DataFrame | None,
               actions: pd.DataFrame | None = None) -> dict[str, Any]:
    """One side's run-level counts: instances started (their "loading" rows), tier copies (every tier move but an
    eviction or an initial placement; the simulator names them cache / demote / promote, live records them all as
    copies) and evictions (the simulator's "evict" moves; live, the gateway's evict actions that were done)."""
    started = int((instances["event"] == "loading").sum()) if instances is not None and len(instances) else 0
    kinds = moves["kind"].astype(str) if moves is not None and len(moves) else pd.Series([], dtype=str)
    evictions = int((kinds == "evict").sum())
    if actions is not None and len(actions):
        evictions += int(((actions["kind"] == "evict") & (actions["outcome"] == "done")).sum())
    return {"instances_started": started, "tier_copies": int((~kinds.isin(["evict", "initial"])).sum()),
            "evictions": evictions}


def compare_runs(live: dict[str, Any], sim: dict[str, Any]) -> dict[str, Any]:
    """{count: {live, sim, rel_err}} for instances started, tier copies and evictions (rel_err None if live is 0)."""
    return {k: {"live": live[k], "sim": sim[k], "rel_err": (sim[k] - live[k]) / live[k] if live[k] else None}
            for k in ("instances_started", "tier_copies", "evictions")}


def fidelity(live: pd.DataFrame, sim: pd.DataFrame, joined: pd.DataFrame | None = None,
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """fidelity.json's content: request counts (and ids missing or not completed on either side), the four
    metrics' and the phases' error stats, cold starts by tier on each side, decision agreement and its first
    divergence; `extra` (policy, workload, seed, scaling, ...) is laid over it."""
    j = join(live, sim) if joined is None else joined
    in_live, in_sim = j["in_live"], j["in_sim"]
    both = j[in_live & in_sim]
    agreement, first = decisions(j)
    not_completed_live = j[in_live & (j["outcome_live"] != "completed")]
    not_completed_sim = j[in_sim & (j["outcome_sim"] != "completed")]
    out: dict[str, Any] = {
        "requests": {"live": int(in_live.sum()), "sim": int(in_sim.sum()), "joined": len(both),
                     "missing_live": [int(i) for i in j.loc[~in_live, "request_id"]],
                     "missing_sim": [int(i) for i in j.loc[~in_sim, "request_id"]],
                     "lost_live": {str(int(r.request_id)): str(r.reason_live or r.outcome_live)
                                   for r in not_completed_live.itertuples()},
                     "lost_sim": {str(int(r.request_id)): str(r.reason_sim or r.outcome_sim)
                                  for r in not_completed_sim.itertuples()},
                     # completed for the client but the gateway has no row: its phases are unknown
                     "live_without_gateway_row": [int(i) for i in j.loc[
                         in_live & (j["outcome_live"] == "completed") & (j["node_live"].fillna("") == ""),
                         "request_id"]],
                     # lost before the gateway answered: their decision (and whether they cold-started) is
                     # unknown live, so live's cold starts by tier may undercount by up to this many
                     "lost_live_undecided": [int(i) for i in j.loc[
                         in_live & (j["outcome_live"] != "completed") & (j["node_live"].fillna("") == ""),
                         "request_id"]],
                     "decided": len(decided(j))},
    }
    for m in METRICS:
        out[m] = error_stats(both[f"{m}_rel_err"], both.get(f"{m}_abs_err_s"))
    out["phases"] = {p: error_stats(both[f"{p}_rel_err"], both.get(f"{p}_abs_err_s"))
                     for p in PHASES if f"{p}_rel_err" in both}
    out["cold_starts_by_tier"] = {"live": cold_starts_by_tier(live), "sim": cold_starts_by_tier(sim)}
    out["decision_agreement"] = agreement
    out["first_divergence"] = first
    if extra:
        out.update(extra)
    return out
