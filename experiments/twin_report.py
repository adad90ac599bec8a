"""`docs/fidelity.md` from the twin's fidelity.json files (pure: dicts in, markdown out).

`render(runs, meta)` writes one table per metric (rows policy x workload: n joined, median |err|, p90 |err|,
bias, target, met?), the per-run percentile comparison (TTFT p50 / p90, TPOT p50), the phases, cold starts by
source tier live vs sim, decision agreement with the first divergence, the calibration used, how the report was
made and a discussion of every miss generated from the numbers (so a rerun cannot leave stale prose behind).
`run_percentiles(joined)` adds the per-run percentiles that fidelity.json does not carry (from twin.parquet).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Target:
    """One fidelity target: `stat` of `metric` must be <= `limit` (or >= for agreement)."""

    metric: str
    stat: str
    limit: float
    text: str


#: the issue's targets (relative errors; agreement a share)
TARGETS: dict[str, Target] = {
    "cold_start_median": Target("cold_start_s", "median_abs_err", 0.10, "cold-start median |err| <= 10%"),
    "cold_start_p90": Target("cold_start_s", "p90_abs_err", 0.20, "cold-start p90 |err| <= 20%"),
    "phase_median": Target("phases", "median_abs_err", 0.10, "each phase's median |err| <= 10%"),
    "ttft_p50": Target("ttft_s", "p50", 0.15, "run TTFT p50 within 15%"),
    "ttft_p90": Target("ttft_s", "p90", 0.15, "run TTFT p90 within 15%"),
    "tpot_p50": Target("tpot_s", "p50", 0.10, "run TPOT p50 within 10%"),
    "tier_counts": Target("cold_starts_by_tier", "rel", 0.10, "cold starts per source tier within 10%"),
    "agreement": Target("decision_agreement", "share", 0.90, "decision agreement >= 90% (steady workload)"),
}
#: per-request metrics shown as tables; the cold-start one carries its targets, the others are informative
METRIC_TABLES: tuple[tuple[str, str], ...] = (("cold_start_s", "Cold-start latency per request"),
                                              ("ttft_s", "TTFT per request"), ("tpot_s", "TPOT per request"),
                                              ("e2e_s", "End-to-end latency per request"))
PERCENTILES: tuple[tuple[str, str], ...] = (("ttft_s", "p50"), ("ttft_s", "p90"), ("tpot_s", "p50"))


def run_percentiles(joined: pd.DataFrame) -> dict[str, dict[str, dict[str, float | None]]]:
    """{metric: {p50|p90: {live, sim, rel_err}}} over each side's completed requests (twin.parquet's columns)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for metric, q in PERCENTILES:
        row: dict[str, float | None] = {}
        for world in ("live", "sim"):
            col = f"{metric}_{world}"
            v = joined.loc[joined[f"in_{world}"], col].astype(float).to_numpy() if col in joined else np.array([])
            v = v[np.isfinite(v)]
            row[world] = float(np.quantile(v, int(q[1:]) / 100)) if v.size else None
        lv, sv = row["live"], row["sim"]
        row["rel_err"] = (sv - lv) / lv if lv and sv is not None else None
        out.setdefault(metric, {})[q] = row
    return out


# --------------------------------------------------------------------------- formatting


def pct(x: float | None) -> str:
    """A relative value as a signed-free percent ("12.3%"), "n/a" for None / NaN."""
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def spct(x: float | None) -> str:
    """A relative value as a signed percent ("+12.3%")."""
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}%"


def verdict(value: float | None, limit: float, at_least: bool = False) -> str:
    """"yes" / "**no**" against the limit; "n/a" when there is nothing to judge."""
    if value is None or not math.isfinite(value):
        return "n/a"
    ok = value >= limit if at_least else value <= limit
    return "yes" if ok else "**no**"


def _label(fid: Mapping[str, Any]) -> tuple[str, str]:
    return str(fid.get("policy")), str(fid.get("report_workload") or fid.get("workload"))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a "|err|" inside a cell would end it


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table; pipes inside cells are escaped."""
    line = lambda cells: "| " + " | ".join(_cell(str(c)) for c in cells) + " |"  # noqa: E731
    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


def tier_errors(fid: Mapping[str, Any]) -> dict[str, float | None]:
    """Per source tier (either side): |sim - live| / live cold starts (None where live has none)."""
    t = fid.get("cold_starts_by_tier") or {}
    live, sim = t.get("live") or {}, t.get("sim") or {}
    return {k: (abs(sim.get(k, 0) - live[k]) / live[k] if live.get(k) else None)
            for k in sorted(set(live) | set(sim))}


# --------------------------------------------------------------------------- sections


def metric_section(runs: Sequence[Mapping[str, Any]], metric: str, title: str) -> list[str]:
    """One table: rows policy x workload with n, median / p90 |err|, bias, and (cold start) the verdicts."""
    targeted = metric == "cold_start_s"
    header = ["policy", "workload", "n joined", "median |err|", "p90 |err|", "bias"]
    if targeted:
        header += ["target", "met?"]
    rows = []
    for fid in runs:
        s = fid.get(metric) or {}
        row = [*_label(fid), str(s.get("n", 0)), pct(s.get("median_abs_err")), pct(s.get("p90_abs_err")),
               spct(s.get("bias"))]
        if targeted:
            a, b = TARGETS["cold_start_median"], TARGETS["cold_start_p90"]
            row += ["median <= 10%, p90 <= 20%",
                    f"{verdict(s.get(a.stat), a.limit)} / {verdict(s.get(b.stat), b.limit)}"]
        rows.append(row)
    note = "" if targeted else " (no per-request target; the run-level target is in the percentile table)"
    return [f"### {title}{note}", "", *_table(header, rows), ""]


def percentile_section(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """TTFT p50 / p90 and TPOT p50 of each run, live vs sim, against their targets."""
    header = ["policy", "workload", "metric", "live", "sim", "error", "target", "met?"]
    rows = []
    for fid in runs:
        pcs = fid.get("percentiles") or {}
        for metric, q in PERCENTILES:
            t = TARGETS[f"{metric.removesuffix('_s')}_{q}"]
            r = (pcs.get(metric) or {}).get(q) or {}
            err = r.get("rel_err")
            rows.append([*_label(fid), f"{metric.removesuffix('_s').upper()} {q}", _secs(r.get("live")),
                         _secs(r.get("sim")), spct(err), f"<= {pct(t.limit)}",
                         verdict(None if err is None else abs(err), t.limit)])
    return ["### TTFT and TPOT percentiles per run", "", *_table(header, rows), ""]


def _secs(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else (f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s")


def phase_section(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Median |err| per phase per run (target <= 10% each), n in brackets."""
    phases = sorted({p for fid in runs for p, s in (fid.get("phases") or {}).items() if s.get("n")})
    header = ["policy", "workload", *phases, "phases met?"]
    lim = TARGETS["phase_median"].limit
    rows = []
    for fid in runs:
        ph = fid.get("phases") or {}
        cells, verdicts = [], []
        for p in phases:
            s = ph.get(p) or {}
            cells.append(f"{pct(s.get('median_abs_err'))} (n={s.get('n', 0)})")
            if s.get("n"):
                verdicts.append(verdict(s.get("median_abs_err"), lim))
        met = "n/a" if not verdicts else ("yes" if all(v == "yes" for v in verdicts) else
                                          f"**no** ({sum(v != 'yes' for v in verdicts)} of {len(verdicts)})")
        rows.append([*_label(fid), *cells, met])
    return ["### Phases (median |err| per request, target <= 10% each)", "", *_table(header, rows), ""]


def tier_section(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Cold starts per source tier, live vs sim, target within 10% per tier."""
    header = ["policy", "workload", "tier", "live", "sim", "error", "met?"]
    rows = []
    for fid in runs:
        t = fid.get("cold_starts_by_tier") or {}
        for tier, err in tier_errors(fid).items():
            rows.append([*_label(fid), tier, str((t.get("live") or {}).get(tier, 0)),
                         str((t.get("sim") or {}).get(tier, 0)), pct(err),
                         verdict(err, TARGETS["tier_counts"].limit) if err is not None else "**no** (live 0)"])
    return ["### Cold starts by source tier (target: within 10% per tier)", "", *_table(header, rows), ""]


def _decision(d: Mapping[str, Any] | None) -> str:
    if not d:
        return ""
    return f"cold={d.get('cold_start')}, node={d.get('node')}, tier={d.get('source_tier')}"


def agreement_section(runs: Sequence[Mapping[str, Any]], steady: str) -> list[str]:
    """Decision agreement per run (target >= 90% on the steady workload) and each run's first divergence."""
    header = ["policy", "workload", "agreement", "target", "met?", "first divergence (request, model: live | sim)"]
    rows = []
    for fid in runs:
        policy, wl = _label(fid)
        a = fid.get("decision_agreement")
        is_steady = wl == steady
        first = fid.get("first_divergence")
        div = (f"#{first['request_id']} {first.get('model')}: {_decision(first.get('live'))} | "
               f"{_decision(first.get('sim'))}") if first else "none"
        rows.append([policy, wl, pct(a), ">= 90%" if is_steady else "(informative)",
                     verdict(a, TARGETS["agreement"].limit, at_least=True) if is_steady else "-", div])
    return ["### Decision agreement (cold/warm, node, source tier per request)", "", *_table(header, rows), ""]


# --------------------------------------------------------------------------- misses


def misses(runs: Sequence[Mapping[str, Any]], steady: str) -> list[str]:
    """One factual line per target missed: the run, the number, the target, and what the data say about it."""
    out: list[str] = []
    for fid in runs:
        policy, wl = _label(fid)
        name = f"{policy} / {wl}"
        cs = fid.get("cold_start_s") or {}
        n_cold = int(cs.get("n") or 0)
        for key in ("cold_start_median", "cold_start_p90"):
            t = TARGETS[key]
            v = cs.get(t.stat)
            if verdict(v, t.limit) == "**no**":
                worst = _worst_phase(fid)
                out.append(f"- **{name}**: {t.text} missed: {pct(v)} over {n_cold} cold start(s), bias "
                           f"{spct(cs.get('bias'))} ({'sim slower' if (cs.get('bias') or 0) > 0 else 'sim faster'})"
                           f"{'; the largest phase error is ' + worst if worst else ''}"
                           f"{'; with so few cold starts one outlier sets the statistic' if n_cold < 5 else ''}.")
        lim = TARGETS["phase_median"].limit
        bad = [(p, s) for p, s in (fid.get("phases") or {}).items()
               if s.get("n") and verdict(s.get("median_abs_err"), lim) == "**no**"]
        if bad:
            parts = ", ".join(f"{p} {pct(s['median_abs_err'])} (bias {spct(s.get('bias'))}, n={s['n']})"
                              for p, s in bad)
            out.append(f"- **{name}**: phase medians above 10%: {parts}.")
        for metric, q in PERCENTILES:
            t = TARGETS[f"{metric.removesuffix('_s')}_{q}"]
            r = ((fid.get("percentiles") or {}).get(metric) or {}).get(q) or {}
            err = r.get("rel_err")
            if err is not None and abs(err) > t.limit:
                out.append(f"- **{name}**: {t.text} missed: live {_secs(r.get('live'))}, sim {_secs(r.get('sim'))}"
                           f" ({spct(err)}){_percentile_hint(metric, r)}.")
        bad_tiers = {k: e for k, e in tier_errors(fid).items() if e is None or e > TARGETS["tier_counts"].limit}
        if bad_tiers:
            t = fid.get("cold_starts_by_tier") or {}
            out.append(f"- **{name}**: cold starts by tier differ: live {t.get('live')}, sim {t.get('sim')}.")
        a = fid.get("decision_agreement")
        if wl == steady and verdict(a, TARGETS["agreement"].limit, at_least=True) == "**no**":
            out.append(f"- **{name}**: decision agreement {pct(a)} < 90%; first divergence at request "
                       f"#{(fid.get('first_divergence') or {}).get('request_id')}.")
    return out


def _worst_phase(fid: Mapping[str, Any]) -> str:
    """The cold start's sub-phase with the largest median |err| (queueing is not part of a cold start)."""
    ph = [(p, s) for p, s in (fid.get("phases") or {}).items()
          if p not in ("cold_start_s", "queue_s") and s.get("n") and s.get("median_abs_err") is not None]
    if not ph:
        return ""
    p, s = max(ph, key=lambda x: x[1]["median_abs_err"])
    return f"{p} ({pct(s['median_abs_err'])}, bias {spct(s.get('bias'))})"


def _percentile_hint(metric: str, r: Mapping[str, Any]) -> str:
    lv = r.get("live")
    if metric == "tpot_s" and lv is not None and lv < 0.02:
        return "; live TPOT is a few ms per token on outputs of at most a few tokens, where per-step overheads "\
               "and timer granularity weigh most"
    if metric == "ttft_s" and lv is not None and lv < 0.2:
        return "; a warm TTFT of this size is dominated by per-request overheads (HTTP, gateway, scheduling)"
    return ""


# --------------------------------------------------------------------------- the document


def render(runs: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """The whole docs/fidelity.md. `meta`: command, date, machine, steady (workload label), workloads
    ({label: description}), calibration ({key: value}), figure (relative path), notes (list of lines),
    discussion (list of lines written by hand or the caller, put before the generated misses)."""
    steady = str(meta.get("steady", "steady"))
    lines = ["# Twin fidelity: live stack vs simulator", "",
             "Generated by `" + str(meta.get("command", "python -m experiments.twin --report")) + "` on "
             f"{meta.get('date', '?')}. Do not edit by hand: rerun the command.", "",
             "Each run replays one trace slice live (experiments.serve + replay, CPU engines) and in the simulator "
             "on the calibrated description (same policy, seed, models, arrivals and lengths) and joins them per "
             "request. Relative error = (sim - live) / live; bias = median signed error (positive: sim slower).",
             "", "## Setup", "", f"- Machine: {meta.get('machine', '?')}"]
    lines += [f"- Workload `{k}`: {v}" for k, v in (meta.get("workloads") or {}).items()]
    lines += [f"- {n}" for n in meta.get("notes") or []]
    lines += ["", "Calibration used (one for all runs):", "",
              *_table(["quantity", "value"], [[k, str(v)] for k, v in (meta.get("calibration") or {}).items()]), ""]
    lines += ["## Targets", "", *_table(["target", "limit"], [[t.text, pct(t.limit)] for t in TARGETS.values()]), ""]
    lines += ["## Requests", "", *_table(
        ["policy", "workload", "live", "sim", "joined", "lost live", "live wall (s)"],
        [[*_label(f), str(f["requests"]["live"]), str(f["requests"]["sim"]), str(f["requests"]["joined"]),
          str(len(f["requests"].get("lost_live") or {})),
          f"{f['live_wall_s']:.1f}" if isinstance(f.get("live_wall_s"), (int, float)) else "n/a"] for f in runs]), ""]
    lines += ["## Results", ""]
    lines += percentile_section(runs)
    for metric, title in METRIC_TABLES:
        lines += metric_section(runs, metric, title)
    lines += phase_section(runs) + tier_section(runs) + agreement_section(runs, steady)
    if meta.get("figure"):
        lines += ["## Figure", "", f"![twin]({meta['figure']})", "",
                  str(meta.get("figure_caption", "")), ""]
    lines += ["## Discussion of the errors above target", ""]
    lines += [*(meta.get("discussion") or []), ""] if meta.get("discussion") else []
    found = misses(runs, steady)
    lines += ["Every miss, from the numbers above:", "", *found] if found else ["Every target is met."]
    return "\n".join(lines).rstrip() + "\n"
