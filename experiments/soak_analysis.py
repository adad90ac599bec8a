"""The soak's verdicts (`experiments.soak`): is each process's memory flat, do its open files, threads and the
gateway's asyncio tasks stay within a constant of their level after warm-up, and was any request lost.

Pure functions over plain samples (lists of dicts), so that the checks are tested on synthetic series (a leak
must fail them, a flat noisy series must pass) without a live stack.

Memory: after the warm-up (the first `warmup_fraction` of the run: imports, the engines' cold starts, connection
pools, allocator arenas reaching their working size), an ordinary least-squares line of RSS over time per
process; flat means the upper end of the slope's 95% interval is under `rss_slope_MB_per_min` AND the last value
is within `rss_end_pct` % of the post-warm-up median. The interval assumes independent residuals; RSS samples
are autocorrelated, which makes it narrower than it should be, so the end-value check is there to catch a late
step that a slope over the whole window dilutes.

Counts (fds, threads, tasks): the largest value after warm-up minus the value at the end of warm-up must be at
most a small constant: these move with the instantaneous concurrency (a socket and a task or two per request in
flight), not smoothly, so a line fit says little; a leak of one per N requests grows without bound and crosses
any constant in a long enough run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Bounds:
    """What "flat" means (the `bounds` block of conf/soak.yaml; the reasons are there)."""

    warmup_fraction: float = 0.2
    rss_slope_MB_per_min: float = 1.0
    rss_end_pct: float = 10.0
    fd_growth: int = 16
    thread_growth: int = 8
    task_growth: int = 32
    min_samples: int = 6  # post-warm-up samples needed for a fit; fewer: the process is not judged

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"bounds.warmup_fraction: must be in [0, 1), got {self.warmup_fraction!r}")
        if self.min_samples < 3:
            raise ValueError(f"bounds.min_samples: at least 3 (a slope's interval needs n - 2 > 0), got "
                             f"{self.min_samples!r}")


def t_quantile_975(dof: int) -> float:
    """The 97.5% quantile of Student's t with `dof` degrees of freedom (scipy when installed, else a close
    approximation: Cornish-Fisher to O(1/dof^3), within 1e-3 for dof >= 3)."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, dof))
    except ImportError:  # pragma: no cover - scipy is a dependency of the project's sim extras
        z = 1.959963984540054
        g1 = (z**3 + z) / 4
        g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
        g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
        return z + g1 / dof + g2 / dof**2 + g3 / dof**3


def fit_line(t_s: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """OLS fit y = a + b t; the slope per minute with its 95% interval (t-distribution, n - 2 dof)."""
    t = np.asarray(t_s, dtype=float) / 60.0
    v = np.asarray(y, dtype=float)
    n = len(t)
    if n < 3 or float(np.ptp(t)) == 0.0:
        raise ValueError(f"a line needs at least 3 samples at different times, got {n}")
    tm, vm = t.mean(), v.mean()
    sxx = float(((t - tm) ** 2).sum())
    slope = float(((t - tm) * (v - vm)).sum() / sxx)
    intercept = float(vm - slope * tm)
    resid = v - (intercept + slope * t)
    s2 = float((resid**2).sum() / (n - 2))
    half = t_quantile_975(n - 2) * math.sqrt(s2 / sxx)
    return {"slope_per_min": slope, "slope_lo": slope - half, "slope_hi": slope + half, "intercept": intercept,
            "n": n, "resid_sd": math.sqrt(s2)}


def series_by_process(samples: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Samples grouped by their `proc` label, in time order."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for s in samples:
        out.setdefault(str(s["proc"]), []).append(s)
    for rows in out.values():
        rows.sort(key=lambda r: r["t_s"])
    return out


def count_growth(t_s: Sequence[float], values: Sequence[float], warmup_end_s: float) -> dict[str, float] | None:
    """{baseline (the last value at or before the end of warm-up), max_after, growth}; None without both."""
    before = [v for t, v in zip(t_s, values, strict=True) if t <= warmup_end_s and not math.isnan(v)]
    after = [v for t, v in zip(t_s, values, strict=True) if t > warmup_end_s and not math.isnan(v)]
    if not before or not after:
        return None
    return {"baseline": float(before[-1]), "max_after": float(max(after)), "end": float(after[-1]),
            "growth": float(max(after) - before[-1])}


def analyze_process(rows: Sequence[Mapping[str, Any]], warmup_end_s: float, bounds: Bounds) -> dict[str, Any]:
    """One process's fit and checks; `judged` False when it has too few samples after warm-up (e.g. an engine
    started late or stopped early), in which case it passes nothing and fails nothing."""
    t = [float(r["t_s"]) for r in rows]
    post = [r for r in rows if float(r["t_s"]) > warmup_end_s]
    out: dict[str, Any] = {"role": rows[0].get("role", ""), "pid": rows[0].get("pid"), "samples": len(rows),
                           "post_warmup_samples": len(post), "judged": len(post) >= bounds.min_samples}
    if not out["judged"]:
        return out
    rss = [float(r["rss_MB"]) for r in post]
    fit = fit_line([float(r["t_s"]) for r in post], rss)
    median = float(np.median(rss))
    end_pct = abs(rss[-1] - median) / median * 100.0 if median > 0 else 0.0
    out["rss"] = {**fit, "median_MB": median, "start_MB": rss[0], "end_MB": rss[-1], "end_vs_median_pct": end_pct,
                  "max_MB": max(rss)}
    out["rss_flat"] = bool(fit["slope_hi"] < bounds.rss_slope_MB_per_min and end_pct <= bounds.rss_end_pct)
    for key, bound in (("fds", bounds.fd_growth), ("threads", bounds.thread_growth)):
        g = count_growth(t, [float(r.get(key, math.nan)) for r in rows], warmup_end_s)
        out[key] = g
        out[f"{key}_flat"] = bool(g is None or g["growth"] <= bound)
    out["flat"] = bool(out["rss_flat"] and out["fds_flat"] and out["threads_flat"])
    return out


def analyze(samples: Sequence[Mapping[str, Any]], tasks: Sequence[Mapping[str, Any]], duration_s: float,
            bounds: Bounds) -> dict[str, Any]:
    """Every process's checks, the gateway's task-count check, and the overall `flat` verdict.

    `samples`: {t_s, proc, role, pid, rss_MB, fds, threads}; `tasks`: {t_s, tasks} (the gateway's asyncio tasks).
    """
    warmup_end_s = bounds.warmup_fraction * duration_s
    procs = {name: analyze_process(rows, warmup_end_s, bounds) for name, rows in series_by_process(samples).items()}
    judged = {n: p for n, p in procs.items() if p["judged"]}
    task_growth = count_growth([float(r["t_s"]) for r in tasks], [float(r["tasks"]) for r in tasks], warmup_end_s)
    tasks_flat = task_growth is not None and task_growth["growth"] <= bounds.task_growth
    gateway_judged = any(p["role"] == "gateway" for p in judged.values())
    flat = bool(judged and gateway_judged and all(p["flat"] for p in judged.values()) and tasks_flat)
    return {"bounds": asdict(bounds), "warmup_end_s": warmup_end_s, "processes": procs,
            "tasks": {"growth": task_growth, "flat": bool(tasks_flat)},
            "verdict": {"flat": flat, "rss_flat": bool(judged) and all(p["rss_flat"] for p in judged.values()),
                        "fds_flat": all(p["fds_flat"] for p in judged.values()),
                        "threads_flat": all(p["threads_flat"] for p in judged.values()), "tasks_flat": bool(tasks_flat),
                        "processes_judged": len(judged), "gateway_judged": gateway_judged,
                        "not_flat": sorted(n for n, p in judged.items() if not p["flat"])}}


def lost_requests(client: Sequence[Mapping[str, Any]], gateway_ids: Sequence[int],
                  gateway_outcomes: Mapping[int, str] | None = None) -> dict[str, Any]:
    """Did every request the client sent end exactly once on each side?

    `client`: one dict per request sent, {outcome, reason, gateway_id (None when no response header came back),
    hung (still running past its deadline when the run ended)}. The client side: every request has exactly one
    outcome among completed / rejected / failed, a failure names its reason, and none hung. The gateway side:
    as many rows as requests sent, no request id twice, every id the client was told is among them, and where
    both sides know the outcome, they agree on completed vs not.
    """
    outcomes = ("completed", "rejected", "failed")
    by_outcome = {o: sum(1 for c in client if c.get("outcome") == o) for o in outcomes}
    no_outcome = sum(1 for c in client if c.get("outcome") not in outcomes)
    unexplained = sum(1 for c in client if c.get("outcome") == "failed" and not c.get("reason"))
    hung = sum(1 for c in client if c.get("hung"))
    told = [int(c["gateway_id"]) for c in client if c.get("gateway_id") is not None]
    gw = [int(i) for i in gateway_ids]
    gw_set = set(gw)
    duplicated_client = len(told) - len(set(told))
    duplicated_gateway = len(gw) - len(gw_set)
    missing = sorted(set(told) - gw_set)
    disagree = []
    if gateway_outcomes is not None:
        for c in client:
            gid = c.get("gateway_id")
            if gid is None or int(gid) not in gateway_outcomes:
                continue
            if (c.get("outcome") == "completed") != (gateway_outcomes[int(gid)] == "completed"):
                disagree.append(int(gid))
    reasons: dict[str, int] = {}
    for c in client:
        if c.get("outcome") != "completed":
            key = f"{c.get('outcome')}:{c.get('reason') or '?'}"
            reasons[key] = reasons.get(key, 0) + 1
    ok = bool(no_outcome == 0 and unexplained == 0 and hung == 0 and len(gw) == len(client)
              and not duplicated_client and not duplicated_gateway and not missing and not disagree)
    return {"sent": len(client), **by_outcome, "no_outcome": no_outcome, "failed_without_reason": unexplained,
            "hung": hung, "with_request_id": len(told), "gateway_rows": len(gw), "duplicate_ids_client":
            duplicated_client, "duplicate_ids_gateway": duplicated_gateway, "missing_in_gateway": missing[:20],
            "outcome_disagreements": disagree[:20], "reasons": dict(sorted(reasons.items())), "no_lost_request": ok}
