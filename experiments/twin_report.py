"""`docs/fidelity.md` from the twin's runs pooled across seeds (pure: summaries in, markdown out).

`render(groups, meta)` takes one `experiments.twin_seeds.summarize` entry per policy x workload (every metric
pooled across seeds with a 95% bootstrap interval) and writes: the requests, the verdicts at a glance, the per-run
percentile comparison (TTFT p50 / p90, TPOT p50), one table per per-request metric, the phases, cold starts by
source tier, decision agreement with the first divergences, the calibration used, how the report was made, and a
list of every target missed and every one inside the noise, generated from the numbers (so a rerun cannot leave
stale prose behind). A target is met when its whole interval is on the right side of the limit, missed when the
whole interval is on the wrong side, and inside the noise otherwise (`experiments.twin_seeds.judge`).
`run_percentiles(joined)` gives one run's percentiles from its twin.parquet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from experiments.twin_seeds import MET, MIN_N, MISSED, NA, NOISE, PERCENTILES, RESAMPLES, judge


@dataclass(frozen=True)
class Target:
    """One fidelity target: `stat` of `metric` must be <= `limit` (>= with at_least; |signed error| <= limit with
    two_sided); below `min_n` samples the verdict is "inside the noise"."""

    metric: str
    stat: str
    limit: float
    text: str
    at_least: bool = False
    two_sided: bool = False
    min_n: int = 0

    def judge(self, est: Mapping[str, Any] | None) -> str:
        """met / missed / inside the noise / n/a for an estimate {value, lo, hi, n}."""
        return judge(est, self.limit, at_least=self.at_least, two_sided=self.two_sided, min_n=self.min_n)


#: the issue's targets (relative errors; agreement a share)
TARGETS: dict[str, Target] = {
    "cold_start_median": Target("cold_start_s", "median_abs_err", 0.10, "cold-start median |err| <= 10%",
                                min_n=MIN_N),
    "cold_start_p90": Target("cold_start_s", "p90_abs_err", 0.20, "cold-start p90 |err| <= 20%", min_n=MIN_N),
    "phase_median": Target("phases", "median_abs_err", 0.10, "each phase's median |err| <= 10%", min_n=MIN_N),
    "ttft_p50": Target("ttft_s", "p50", 0.15, "run TTFT p50 within 15%", two_sided=True),
    "ttft_p90": Target("ttft_s", "p90", 0.15, "run TTFT p90 within 15%", two_sided=True),
    "tpot_p50": Target("tpot_s", "p50", 0.10, "run TPOT p50 within 10%", two_sided=True),
    "tier_counts": Target("cold_starts_by_tier", "rel", 0.10, "cold starts per source tier within 10%"),
    "agreement": Target("decision_agreement", "share", 0.90, "decision agreement >= 90% (steady workload)",
                        at_least=True),
}
#: per-request metrics shown as tables; the cold-start one carries its targets, the others are informative
METRIC_TABLES: tuple[tuple[str, str], ...] = (("cold_start_s", "Cold-start latency per request"),
                                              ("ttft_s", "TTFT per request"), ("tpot_s", "TPOT per request"),
                                              ("e2e_s", "End-to-end latency per request"))
ERR_STATS: tuple[tuple[str, str], ...] = (("median_abs_err", "median |err|"), ("p90_abs_err", "p90 |err|"),
                                          ("bias", "bias"))


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
    """A relative value as a percent ("12.3%"), "n/a" for None / NaN, "inf" for an infinite one."""
    if x is None or math.isnan(x):
        return "n/a"
    return "inf" if math.isinf(x) else f"{100 * x:.1f}%"


def spct(x: float | None) -> str:
    """A relative value as a signed percent ("+12.3%")."""
    if x is None or math.isnan(x):
        return "n/a"
    return "inf" if math.isinf(x) else f"{100 * x:+.1f}%"


def interval(est: Mapping[str, Any] | None, signed: bool = False) -> str:
    """An estimate's value and its interval: "5.8% [2.5%, 8.0%]"."""
    f = spct if signed else pct
    if not est or est.get("value") is None:
        return "n/a"
    if est.get("lo") is None:
        return f(est["value"])
    return f"{f(est['value'])} [{f(est['lo'])}, {f(est['hi'])}]"


def per_seed(est: Mapping[str, Any] | None, signed: bool = False) -> str:
    """Each seed's value alone, in seed order ("5.8%, 4.8%, 7.1%")."""
    f = spct if signed else pct
    return ", ".join(f(v) for v in (est or {}).get("per_seed") or []) or "n/a"


def shown(verdict: str) -> str:
    """A verdict as a cell: missed in bold, so a reader's eye finds it."""
    return f"**{verdict}**" if verdict == MISSED else verdict


def _secs(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else (f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s")


def _label(g: Mapping[str, Any]) -> list[str]:
    return [str(g.get("policy")), str(g.get("workload"))]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a "|err|" inside a cell would end it


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table; pipes inside cells are escaped."""
    line = lambda cells: "| " + " | ".join(_cell(str(c)) for c in cells) + " |"  # noqa: E731
    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


# --------------------------------------------------------------------------- the verdicts


def judgements(g: Mapping[str, Any], steady: str) -> list[tuple[str, str, Mapping[str, Any], str]]:
    """Every target judged on one policy x workload: (target key, what, estimate, verdict); agreement only on the
    steady workload, phases and tiers one judgement each."""
    out: list[tuple[str, str, Mapping[str, Any], str]] = []
    cs = (g.get("metrics") or {}).get("cold_start_s") or {}
    for key in ("cold_start_median", "cold_start_p90"):
        t = TARGETS[key]
        out.append((key, "cold start " + t.stat.removesuffix("_abs_err"), cs.get(t.stat) or {},
                    t.judge(cs.get(t.stat))))
    for metric, q in PERCENTILES:
        key = f"{metric.removesuffix('_s')}_{q}"
        est = (((g.get("percentiles") or {}).get(metric) or {}).get(q) or {}).get("rel_err") or {}
        out.append((key, f"{metric.removesuffix('_s').upper()} {q}", est, TARGETS[key].judge(est)))
    for p, s in sorted((g.get("phases") or {}).items()):
        est = s.get("median_abs_err") or {}
        if est.get("n"):
            out.append(("phase_median", p, est, TARGETS["phase_median"].judge(est)))
    for tier, est in ((g.get("tiers") or {}).get("rel_err") or {}).items():
        out.append(("tier_counts", f"tier {tier}", est, TARGETS["tier_counts"].judge(est)))
    if g.get("workload") == steady:
        est = g.get("agreement") or {}
        out.append(("agreement", "decision agreement", est, TARGETS["agreement"].judge(est)))
    return out


def overview_section(groups: Sequence[Mapping[str, Any]], steady: str) -> list[str]:
    """Per target: how many policy x workload (x phase, x tier) judgements were met, missed, inside the noise."""
    counts = {k: dict.fromkeys((MET, MISSED, NOISE, NA), 0) for k in TARGETS}
    for g in groups:
        for key, _, _, v in judgements(g, steady):
            counts[key][v] += 1
    rows = [[t.text, *(str(counts[k][v]) for v in (MET, MISSED, NOISE, NA))] for k, t in TARGETS.items()]
    return ["### Verdicts at a glance", "", *_table(["target", MET, MISSED, NOISE, NA], rows), ""]


# --------------------------------------------------------------------------- sections


def requests_section(groups: Sequence[Mapping[str, Any]]) -> list[str]:
    """Requests per policy x workload, summed over seeds, and the live wall time of each seed's run."""
    rows = []
    for g in groups:
        r = g["requests"]
        walls = ", ".join("n/a" if w is None else f"{w:.1f}" for w in g.get("live_wall_s") or [])
        rows.append([*_label(g), ", ".join(str(s) for s in g.get("seeds") or []), str(r["live"]), str(r["sim"]),
                     str(r["joined"]), str(r.get("lost_live", 0)), walls])
    header = ["policy", "workload", "seeds", "live", "sim", "joined", "lost live", "live wall per seed (s)"]
    return [*_table(header, rows), ""]


def percentile_section(groups: Sequence[Mapping[str, Any]]) -> list[str]:
    """TTFT p50 / p90 and TPOT p50 over all seeds' requests, live vs sim, against their targets."""
    header = ["policy", "workload", "metric", "live", "sim", "error [95% CI]", "per seed", "n", "target", "verdict"]
    rows = []
    for g in groups:
        for metric, q in PERCENTILES:
            t = TARGETS[f"{metric.removesuffix('_s')}_{q}"]
            r = ((g.get("percentiles") or {}).get(metric) or {}).get(q) or {}
            est = r.get("rel_err") or {}
            rows.append([*_label(g), f"{metric.removesuffix('_s').upper()} {q}", _secs(r.get("live")),
                         _secs(r.get("sim")), interval(est, signed=True), per_seed(est, signed=True),
                         str(est.get("n", 0)), f"within {pct(t.limit)}", shown(t.judge(est))])
    return ["### TTFT and TPOT percentiles (all seeds' requests completed on both sides, pooled)", "",
            *_table(header, rows), ""]


def metric_section(groups: Sequence[Mapping[str, Any]], metric: str, title: str) -> list[str]:
    """One table: rows policy x workload with n and median / p90 |err| and bias with their intervals; the cold
    start's two targets judged."""
    targeted = metric == "cold_start_s"
    header = ["policy", "workload", "n", *(f"{name} [95% CI]" for _, name in ERR_STATS)]
    if targeted:
        header += ["median <= 10%", "p90 <= 20%"]
    rows = []
    for g in groups:
        s = (g.get("metrics") or {}).get(metric) or {}
        n = (s.get("median_abs_err") or {}).get("n", 0)
        row = [*_label(g), str(n), *(interval(s.get(k), signed=k == "bias") for k, _ in ERR_STATS)]
        if targeted:
            row += [shown(TARGETS[k].judge(s.get(TARGETS[k].stat))) for k in ("cold_start_median", "cold_start_p90")]
        rows.append(row)
    note = "" if targeted else " (no per-request target; the run-level target is in the percentile table)"
    return [f"### {title}{note}", "", *_table(header, rows), ""]


def phase_section(groups: Sequence[Mapping[str, Any]]) -> list[str]:
    """Median |err| per phase (target <= 10% each) and its bias, one row per policy x workload x phase."""
    header = ["policy", "workload", "phase", "n", "median |err| [95% CI]", "bias [95% CI]", "verdict"]
    rows = []
    for g in groups:
        for p, s in sorted((g.get("phases") or {}).items()):
            est = s.get("median_abs_err") or {}
            if est.get("n"):
                rows.append([*_label(g), p, str(est["n"]), interval(est), interval(s.get("bias"), signed=True),
                             shown(TARGETS["phase_median"].judge(est))])
    return ["### Phases (median |err| per request, target <= 10% each)", "", *_table(header, rows), ""]


def tier_section(groups: Sequence[Mapping[str, Any]]) -> list[str]:
    """Cold starts per source tier summed over seeds, live vs sim, target within 10% per tier."""
    header = ["policy", "workload", "tier", "live", "sim", "|error| [95% CI]", "verdict"]
    rows = []
    for g in groups:
        t = g.get("tiers") or {}
        for tier, est in (t.get("rel_err") or {}).items():
            rows.append([*_label(g), tier, str((t.get("live") or {}).get(tier, 0)),
                         str((t.get("sim") or {}).get(tier, 0)), interval(est),
                         shown(TARGETS["tier_counts"].judge(est))])
    return ["### Cold starts by source tier (target: within 10% per tier; inf: live has none)", "",
            *_table(header, rows), ""]


def _decision(d: Mapping[str, Any] | None) -> str:
    if not d:
        return ""
    return f"cold={d.get('cold_start')}, node={d.get('node')}, tier={d.get('source_tier')}"


def agreement_section(groups: Sequence[Mapping[str, Any]], steady: str) -> list[str]:
    """Decision agreement pooled over seeds (target >= 90% on the steady workload) and the first divergence of the
    first seed that has one."""
    header = ["policy", "workload", "agreement [95% CI]", "per seed", "n", "target", "verdict",
              "first divergence (seed, request, model: live | sim)"]
    rows = []
    for g in groups:
        est = g.get("agreement") or {}
        is_steady = g.get("workload") == steady
        divs = g.get("first_divergence") or []
        d = divs[0] if divs else None
        div = (f"seed {d.get('seed')} #{d['request_id']} {d.get('model')}: {_decision(d.get('live'))} | "
               f"{_decision(d.get('sim'))}") if d else "none"
        rows.append([*_label(g), interval(est), per_seed(est), str(est.get("n", 0)),
                     ">= 90%" if is_steady else "(informative)",
                     shown(TARGETS["agreement"].judge(est)) if is_steady else "-", div])
    return ["### Decision agreement (cold/warm, node, source tier per request)", "", *_table(header, rows), ""]


# --------------------------------------------------------------------------- misses


def misses(groups: Sequence[Mapping[str, Any]], steady: str) -> tuple[list[str], list[str]]:
    """(one factual line per target missed, one per target inside the noise): the run, the number and its
    interval, the target, and what else the data say about it."""
    missed: list[str] = []
    noisy: list[str] = []
    for g in groups:
        name = f"{g.get('policy')} / {g.get('workload')}"
        for key, what, est, v in judgements(g, steady):
            if v not in (MISSED, NOISE):
                continue
            t = TARGETS[key]
            signed = t.two_sided
            line = f"- **{name}**: {what}: {interval(est, signed=signed)} (n={est.get('n', 0)}; {t.text})"
            line += _hint(g, key, what)
            (missed if v == MISSED else noisy).append(line + ".")
    return missed, noisy


def _hint(g: Mapping[str, Any], key: str, what: str) -> str:
    """What else the numbers say about one judgement (the largest phase error, sizes of TPOT, counts by tier)."""
    if key.startswith("cold_start"):
        worst = _worst_phase(g)
        bias = ((g.get("metrics") or {}).get("cold_start_s") or {}).get("bias") or {}
        side = "sim slower" if (bias.get("value") or 0) > 0 else "sim faster"
        return f"; bias {interval(bias, signed=True)} ({side})" + (f"; largest phase error {worst}" if worst else "")
    if key in ("ttft_p50", "ttft_p90", "tpot_p50"):
        metric, q = ("tpot_s" if key.startswith("tpot") else "ttft_s"), key.rsplit("_", 1)[1]
        r = ((g.get("percentiles") or {}).get(metric) or {}).get(q) or {}
        lv = r.get("live")
        text = f"; live {_secs(lv)}, sim {_secs(r.get('sim'))}"
        if metric == "tpot_s" and lv is not None and lv < 0.02:
            text += ("; live TPOT is a few ms per token on outputs of at most a few tokens, where per-step "
                     "overheads and timer granularity weigh most")
        return text
    if key == "tier_counts":
        t = g.get("tiers") or {}
        return f"; live {t.get('live')}, sim {t.get('sim')}"
    if key == "phase_median":
        bias = ((g.get("phases") or {}).get(what) or {}).get("bias") or {}
        return f"; bias {interval(bias, signed=True)}"
    if key == "agreement":
        divs = g.get("first_divergence") or []
        return "; first divergences: " + ", ".join(f"seed {d.get('seed')} #{d['request_id']}" for d in divs) \
            if divs else ""
    return ""


def _worst_phase(g: Mapping[str, Any]) -> str:
    """The cold start's sub-phase with the largest pooled median |err| (queueing is not part of a cold start)."""
    ph = [(p, s["median_abs_err"]) for p, s in (g.get("phases") or {}).items()
          if p not in ("cold_start_s", "queue_s") and (s.get("median_abs_err") or {}).get("value") is not None]
    if not ph:
        return ""
    p, est = max(ph, key=lambda x: x[1]["value"])
    return f"{p} ({interval(est)})"


# --------------------------------------------------------------------------- the document


def run_section(groups: Sequence[Mapping[str, Any]]) -> list[str]:
    """Instances started, tier copies and evictions, live vs simulated, summed over seeds (per seed beside).
    No target: informative, like the counts by tier."""
    rows = []
    for g in groups:
        r = g.get("run")
        if not r:
            continue
        for key, label in (("instances_started", "instances started"), ("tier_copies", "tier copies"),
                           ("evictions", "evictions")):
            lv, sv = sum(r[key]["live"]), sum(r[key]["sim"])
            per = ", ".join(f"{a}/{b}" for a, b in zip(r[key]["live"], r[key]["sim"], strict=True))
            rows.append([*_label(g), label, str(lv), str(sv), spct((sv - lv) / lv if lv else None), per])
    if not rows:
        return []
    return ["### Instances started, tier copies and evictions (summed over seeds; no target)", "",
            *_table(["policy", "workload", "count", "live", "sim", "error", "per seed (live/sim)"], rows), ""]


def inference_section(fit: Mapping[str, Any] | None, doc: str) -> list[str]:
    """The GPU inference model's error against each published measurement (experiments.inference_fit's result):
    the twin above runs CPU engines, whose step times the calibration measures directly, so the GPU model's
    fidelity has its own sources."""
    title = ["## Inference-time model against GPU measurements", ""]
    if not fit:
        return [*title, "Not available: run `python -m experiments.inference_fit` first.", ""]
    rows = []
    for g in fit["gpus"].values():
        name = g["peak"]["name"]
        for label, s in (("one layer's dense operators, fitted", g["dense"]["all"]),
                         ("the same, each model held out of its fit", g["dense"]["held_out_by_model"]),
                         ("NCCL all-reduce, 2-8 GPUs", g["allreduce_err"]["all"])):
            rows.append([name, label, str(s["n"]), pct(s["median_abs_err"]), pct(s["p90_abs_err"]), spct(s["bias"]),
                         MET if s["median_abs_err"] <= 0.10 else f"**{MISSED}**"])
    return [
        *title,
        f"Source: {fit['source']}. Target: median |err| <= 10% against measured step times. Details, by regime, "
        f"tensor-parallel degree and model, and what is not measured (the attention kernel, whole engine steps "
        f"on a GPU): [{doc}]({doc}).", "",
        *_table(["GPU", "what", "n", "median |err|", "p90 |err|", "bias", "median target"], rows), ""]


def render(groups: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """The whole docs/fidelity.md from `experiments.twin_seeds.summarize` entries. `meta`: command, date, machine,
    steady (workload label), workloads ({label: description}), calibration ({key: value}), figure (relative path),
    figure_caption, notes (list of lines), discussion (list of lines written by hand, before the generated list)."""
    steady = str(meta.get("steady", "steady"))
    seeds = sorted({s for g in groups for s in g.get("seeds") or []})
    lines = ["# Twin fidelity: live stack vs simulator", "",
             "Generated by `" + str(meta.get("command", "python -m experiments.twin --report")) + "` on "
             f"{meta.get('date', '?')}. Do not edit by hand: rerun the command.", "",
             "Each run replays one trace slice live (experiments.serve + replay, CPU engines) and in the simulator "
             "on the calibrated description (same policy, seed, models, arrivals and lengths) and joins them per "
             f"request. Every policy x workload runs once per seed ({', '.join(map(str, seeds))}); the seed picks "
             "the arrivals, the models and the lengths. Relative error = (sim - live) / live; bias = median signed "
             "error (positive: sim slower). Requests lost on either side are listed, not compared.", "",
             "## How to read the numbers", "",
             "- Value: the statistic over the requests of all seeds pooled (a median |err| over every seed's errors, "
             "a TTFT p90 over every seed's requests completed on both sides, cold starts per tier summed, agreement "
             "over all joined requests). `per seed`: the same statistic on each seed alone.",
             f"- [95% CI]: a percentile bootstrap over requests ({RESAMPLES} resamples, fixed generator seed), "
             "stratified by seed (each resample draws, within every seed, as many requests as it has). Requests of "
             "one run are not independent (a slow cold start delays those queued behind it), so the interval is, "
             "if anything, too narrow.",
             f"- Verdict: **{MISSED}** when the whole interval is on the wrong side of the limit, {MET} when it is "
             f"all on the right side, {NOISE} when it straddles the limit (the difference from the target is "
             f"inside the noise), or when fewer than {MIN_N} errors enter a per-request statistic.",
             "", "## Setup", "", f"- Machine: {meta.get('machine', '?')}"]
    lines += [f"- Workload `{k}`: {v}" for k, v in (meta.get("workloads") or {}).items()]
    lines += [f"- {n}" for n in meta.get("notes") or []]
    lines += ["", "Calibration used (one for all runs):", "",
              *_table(["quantity", "value"], [[k, str(v)] for k, v in (meta.get("calibration") or {}).items()]), ""]
    lines += ["## Targets", "", *_table(["target", "limit"], [[t.text, pct(t.limit)] for t in TARGETS.values()]), ""]
    lines += ["## Requests (summed over seeds)", "", *requests_section(groups)]
    lines += ["## Results", "", *overview_section(groups, steady), *percentile_section(groups)]
    for metric, title in METRIC_TABLES:
        lines += metric_section(groups, metric, title)
    lines += phase_section(groups) + tier_section(groups) + run_section(groups) + agreement_section(groups, steady)
    lines += inference_section(meta.get("inference"), str(meta.get("inference_doc", "")))
    if meta.get("figure"):
        lines += ["## Figure", "", f"![twin]({meta['figure']})", "", str(meta.get("figure_caption", "")), ""]
    lines += ["## Discussion of the errors above target", ""]
    lines += [*(meta.get("discussion") or []), ""] if meta.get("discussion") else []
    missed, noisy = misses(groups, steady)
    lines += ["Every target missed, from the numbers above:", "", *missed, ""] if missed else \
        ["No target is missed outright.", ""]
    lines += [f"Every target {NOISE} (the interval straddles the limit: more requests or seeds are needed to "
              "tell):", "", *noisy] if noisy else [f"No target is {NOISE}."]
    return "\n".join(lines).rstrip() + "\n"

