"""The policy comparison's report: docs/policies.md, its figures and runs.json (from `experiments.compare` runs).

`tables(settings, runs)` is pure (numbers and verdicts per scenario); `render` turns it into markdown;
`write_report` writes the markdown, the figures and the runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from core.specs import TIER_ORDER
from experiments.compare import METRICS, Run, Settings
from experiments.compare_stats import LEVEL, RESAMPLES, SAME, Estimate, judge_ratio, mean_ci, paired

#: columns of the main table, of the tier table, and the metrics compared pairwise (ratio, or difference)
MAIN = ("cold_mean_s", "cold_p50_s", "cold_p99_s", "ttft_p99_s", "cost_usd", "slo_attainment")
PAIR_RATIOS = ("cold_mean_s", "cold_p99_s", "ttft_p99_s", "cost_usd")
PAIR_DIFFS = ("slo_attainment",)


def _values(runs: Sequence[Run], scenario: str, policy: str, key: str, seeds: Sequence[int]) -> list[float | None]:
    by_seed = {r.seed: r.metrics.get(key) for r in runs if r.scenario == scenario and r.policy == policy}
    return [by_seed.get(s) for s in seeds]


def tables(settings: Settings, runs: Sequence[Run]) -> dict[str, Any]:
    """Per scenario: per-policy estimates of every metric, pairwise comparisons, and the targets' verdicts."""
    out: dict[str, Any] = {}
    seeds = settings.seeds
    tier_keys = [f"cold_{t}" for t in TIER_ORDER] + [f"loads_{t}" for t in TIER_ORDER]
    for scen in settings.scenarios:
        est = {p: {k: mean_ci(_values(runs, scen, p, k, seeds)) for k in (*METRICS, *tier_keys)}
               for p in settings.policies}
        pairs = []
        pols = settings.policies
        for i, a in enumerate(pols):
            for b in pols[:i]:
                cmp = {k: paired(_values(runs, scen, a, k, seeds), _values(runs, scen, b, k, seeds))
                       for k in (*PAIR_RATIOS, *PAIR_DIFFS)}
                pairs.append((a, b, cmp))
        targets = []
        for t in settings.targets:
            if t["a"] not in pols or t["b"] not in pols or (settings.targets_on and scen not in settings.targets_on):
                continue
            pr = paired(_values(runs, scen, t["a"], t["metric"], seeds),
                        _values(runs, scen, t["b"], t["metric"], seeds))
            v = judge_ratio(pr.ratio, float(t["max_ratio"]))
            if t.get("equal_ok") and v == "inside the noise" and pr.ratio_verdict == SAME:
                v = "met (no difference)"
            targets.append({**t, "ratio": pr.ratio, "verdict": v})
        out[scen] = {"estimates": est, "pairs": pairs, "targets": targets}
    return out


def cold_start_sources(settings: Settings, runs: Sequence[Run], scenario: str) -> list[dict[str, Any]]:
    """Where each policy's mean cold start comes from: per (policy, source tier) with cold starts, the share of
    the completed cold-start requests, their mean cold start, its contribution to the policy's mean (share x
    mean: the contributions add up to the mean cold start of each run) and the mean load phases those requests
    waited on (fetch, host -> GPU, engine init left on the critical path). Means over seeds."""
    rows = []
    for p in settings.policies:
        sel = [r for r in runs if r.scenario == scenario and r.policy == p]
        totals = [sum(r.metrics.get(f"cold_{t}") or 0.0 for t in TIER_ORDER) for r in sel]
        for t in TIER_ORDER:
            counts = [r.metrics.get(f"cold_{t}") or 0.0 for r in sel]
            if not any(counts):
                continue
            share = [c / n for c, n in zip(counts, totals, strict=True) if n]
            contrib = [c * (r.metrics.get(f"coldmean_{t}") or 0.0) / n
                       for c, n, r in zip(counts, totals, sel, strict=True) if n]

            def avg(key: str, sel: Sequence[Run] = sel, t: str = t) -> float | None:
                vals = [v for r in sel if (v := r.metrics.get(f"{key}_{t}")) is not None]
                return sum(vals) / len(vals) if vals else None

            rows.append({"policy": p, "tier": t, "share": sum(share) / len(share) if share else None,
                         "mean_s": avg("coldmean"), "contribution_s": sum(contrib) / len(contrib) if contrib else None,
                         "fetch_s": avg("fetch"), "to_gpu_s": avg("togpu"), "engine_init_s": avg("init")})
    return rows


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else (f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}")


def _sources_lines(settings: Settings, runs: Sequence[Run], scenario: str) -> list[str]:
    rows = cold_start_sources(settings, runs, scenario)
    if not rows:
        return []
    lines = ["", f"Where the mean cold start comes from (mean over {len(settings.seeds)} seeds): per source tier, the "
             "share of cold-start requests, their mean cold start, its contribution to the policy's mean (the "
             "contributions add up to it), and the load phases those requests waited on (a request placed on an "
             "instance already loading waited on part of them; engine init = what was left on the critical path "
             "after the weights):", "",
             "| policy | source tier | share | mean cold start (s) | contributes (s) | fetch (s) | host -> GPU (s) | "
             "engine init (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = "n/a" if r["share"] is None else f"{r['share']:.0%}"
        lines.append(f"| `{r['policy']}` | {r['tier']} | {share} | {_num(r['mean_s'])} | {_num(r['contribution_s'])} "
                     f"| {_num(r['fetch_s'])} | {_num(r['to_gpu_s'])} | {_num(r['engine_init_s'])} |")
    return lines


def cloud_floor(runs: Sequence[Run], scenario: str, a: str, b: str) -> float | None:
    """The smallest mean-cold-start ratio a / b that policy a could reach if every one of its cold starts from a
    local tier took no time at all: a's cloud contribution over b's mean cold start (ratio of seed means)."""
    def mean(vals: Sequence[float]) -> float | None:
        return sum(vals) / len(vals) if vals else None

    contrib, base = [], []
    for r in runs:
        if r.scenario != scenario:
            continue
        if r.policy == a:
            n = sum(r.metrics.get(f"cold_{t}") or 0.0 for t in TIER_ORDER)
            if n:
                contrib.append((r.metrics.get("cold_cloud") or 0.0) * (r.metrics.get("coldmean_cloud") or 0.0) / n)
        if r.policy == b and r.metrics.get("cold_mean_s") is not None:
            base.append(float(r.metrics["cold_mean_s"]))
    c, m = mean(contrib), mean(base)
    return None if c is None or not m else c / m


def _ratio_cell(p: Any) -> str:
    r: Estimate = p.ratio
    if r.value is None:
        return "n/a"
    txt = f"{r.value:.3g}x" if r.lo is None else f"{r.value:.3g}x [{r.lo:.3g}, {r.hi:.3g}]"
    if p.ratio_verdict == SAME:
        return f"no difference ({txt})"
    return f"**{txt}**" if p.ratio_verdict != "n/a" else txt


def _diff_cell(p: Any, scale: float = 100.0, unit: str = " pp") -> str:
    d: Estimate = p.diff
    if d.value is None:
        return "n/a"
    if d.lo is None:
        txt = f"{d.value * scale:+.3g}{unit}"
    else:
        txt = f"{d.value * scale:+.3g}{unit} [{d.lo * scale:+.3g}, {d.hi * scale:+.3g}]"
    if p.diff_verdict == SAME:
        return f"no difference ({txt})"
    return f"**{txt}**" if p.diff_verdict != "n/a" else txt


def render(settings: Settings, runs: Sequence[Run], *, command: str, wall_s: float,
           figures: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """The markdown of docs/policies.md."""
    tab = tables(settings, runs)
    n = len(settings.seeds)
    lines = [
        "# Policies compared",
        "",
        f"Generated by `{command}` in {wall_s:.0f} s wall ({len(runs)} simulations, {settings.workers} worker"
        f"{'s' if settings.workers != 1 else ''}); settings in `{_rel(settings.config_path)}`.",
        "",
        f"Every policy runs once per seed ({', '.join(map(str, settings.seeds))}) on every scenario; a seed fixes "
        "the trace, so the policies' runs with one seed see the same requests. Each number is the mean over "
        f"seeds with a {LEVEL:.0%} percentile bootstrap interval over seeds ({RESAMPLES} resamples, fixed "
        "generator seed). Differences between two policies are paired: a resample draws the same seeds for "
        "both, and the ratio of their means (or the difference, for SLO attainment) gets its own interval; "
        "**bold** = the interval excludes 1 (or 0), *no difference* = it contains it. Cold-start latencies are "
        "over completed cold-start requests (those that waited for an instance to load); cost is the run's "
        "GPU + storage + egress cost; SLO attainment the share of requests completed with TTFT under the SLO.",
        "",
    ]
    if settings.notes.strip():
        lines += ["## Reading the tables", "", settings.notes.strip(), ""]
    for scen, t in tab.items():
        over = " ".join([*settings.common, *settings.scenarios[scen]])
        lines += [f"## Scenario `{scen}`", "", f"Overrides: `{over}`." if over else "Overrides: none.", ""]
        head = ["policy", *[METRICS[k][1] + (f" ({METRICS[k][2].strip()})" if METRICS[k][2] else "") for k in MAIN]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in settings.policies:
            lines.append("| " + " | ".join([f"`{p}`", *[t["estimates"][p][k].text(3) for k in MAIN]]) + " |")
        lines += ["", f"Cold-start requests and instance loads by source tier (mean per run over {n} seeds):", ""]
        tiers = [x for x in TIER_ORDER if any(t["estimates"][p][f"loads_{x}"].value or t["estimates"][p][
            f"cold_{x}"].value for p in settings.policies)] or list(TIER_ORDER)
        head = ["policy", "cold starts", *[f"from {x}" for x in tiers], *[f"loads from {x}" for x in tiers]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in settings.policies:
            e = t["estimates"][p]
            cells = [e["cold_starts"].text(3), *[e[f"cold_{x}"].text(3) for x in tiers],
                     *[e[f"loads_{x}"].text(3) for x in tiers]]
            lines.append("| " + " | ".join([f"`{p}`", *cells]) + " |")
        lines += ["", "Paired comparisons (a / b: ratio of means; SLO: a - b in percentage points):", ""]
        head = ["a", "b", *[METRICS[k][1] for k in PAIR_RATIOS], *[METRICS[k][1] for k in PAIR_DIFFS]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for a, b, cmp in t["pairs"]:
            cells = [*[_ratio_cell(cmp[k]) for k in PAIR_RATIOS], *[_diff_cell(cmp[k]) for k in PAIR_DIFFS]]
            lines.append("| " + " | ".join([f"`{a}`", f"`{b}`", *cells]) + " |")
        if t["targets"]:
            lines += ["", "Targets (issue 11), on the ratio of the means a / b: *met* when its whole interval is under "
                      "the limit, *missed* when it is wholly above, *inside the noise* otherwise. For mean cold-start "
                      "targets, *floor* is the ratio a would reach if every one of its cold starts from a local tier "
                      "took no time (its cloud cold starts alone, over b's mean): a floor above the limit means no "
                      "loader or engine start-up could meet the target with that policy's tier choices:", "",
                      "| target | ratio a / b | limit | floor | verdict |", "|---|---|---|---|---|"]
            for g in t["targets"]:
                r: Estimate = g["ratio"]
                rt = "n/a" if r.value is None else (f"{r.value:.3g}" if r.lo is None else
                                                   f"{r.value:.3g} [{r.lo:.3g}, {r.hi:.3g}]")
                floor = (_num(cloud_floor(runs, scen, g["a"], g["b"])) if g["metric"] == "cold_mean_s" else "")
                lines.append(f"| `{g['a']}` vs `{g['b']}`, {METRICS[g['metric']][1]}: {g.get('text', '')} | {rt} "
                             f"| <= {g['max_ratio']} | {floor} | {g['verdict']} |")
        lines += _sources_lines(settings, runs, scen)
        figs = (figures or {}).get(scen) or {}
        if figs:
            lines.append("")
            for caption, path in figs.items():
                lines += [f"![{caption}]({path})", ""]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(settings: Settings, runs: Sequence[Run], out: Path, *, command: str, wall_s: float) -> Path:
    """policies.md, policies/runs.json and the figures into `out`; returns the markdown's path."""
    from experiments.compare_plots import cdf_figure, front_figure

    fig_dir = out / "policies"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, dict[str, str]] = {}
    tab = tables(settings, runs)
    for scen in settings.scenarios:
        sel = [r for r in runs if r.scenario == scen]
        cdf = cdf_figure(sel, settings.policies, fig_dir / f"cold_start_cdf_{scen}.png", scen)
        front = front_figure(tab[scen]["estimates"], settings.policies, fig_dir / f"cost_ttft_{scen}.png", scen)
        figures[scen] = {f"cold-start CDF per policy and source tier ({scen})": f"policies/{cdf.name}",
                         f"cost vs p99 TTFT ({scen})": f"policies/{front.name}"}
    _atomic_write(fig_dir / "runs.json", json.dumps(
        {"command": command, "seeds": list(settings.seeds), "scenarios": settings.scenarios,
         "runs": [{k: v for k, v in asdict(r).items() if k != "cold"} for r in runs]}, indent=1, sort_keys=True))
    doc = out / "policies.md"
    _atomic_write(doc, render(settings, runs, command=command, wall_s=wall_s, figures=figures))
    return doc


def one_line(settings: Settings, runs: Sequence[Run], doc: Path, wall_s: float) -> str:
    """e.g. "compare: 5 policies x 1 scenario x 5 seeds = 25 runs in 140 s (2 workers); pressure: lowest p99
    TTFT sllm 12.3 s, lowest cost mvp $40.1; wrote docs/policies.md"."""
    tab = tables(settings, runs)
    parts = []
    for scen, t in tab.items():
        est = t["estimates"]

        def best(key: str, est: Mapping[str, Any] = est) -> tuple[str, float]:
            vals = [(e[key].value, p) for p, e in est.items() if e[key].value is not None]
            return (min(vals)[1], min(vals)[0]) if vals else ("n/a", float("nan"))

        (pt, vt), (pc, vc) = best("ttft_p99_s"), best("cost_usd")
        parts.append(f"{scen}: lowest p99 TTFT {pt} {vt:.3g} s, lowest cost {pc} ${vc:.4g}")
    ns = len(settings.scenarios)
    return (f"compare: {len(settings.policies)} policies x {ns} scenario{'s' if ns != 1 else ''} x "
            f"{len(settings.seeds)} seeds = {len(runs)} runs in {wall_s:.0f} s ({settings.workers} workers); "
            f"{'; '.join(parts)}; wrote {doc}")
