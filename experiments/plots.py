"""Plots of one run (cold-start CDF by source tier, cost breakdown), of a gathered sweep and of the
claims audit (experiments.claims)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs write files, never open windows
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from core.specs import TIER_ORDER


def cold_start_cdf(requests: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Empirical CDF of cold-start latency, one line per source tier."""
    fig, ax = plt.subplots(figsize=(6, 4))
    cold = requests[requests["cold_start"] & (requests["outcome"] == "completed")]
    drawn = 0
    for tier in TIER_ORDER:
        v = np.sort(cold.loc[cold["source_tier"] == tier, "cold_start_s"].dropna().to_numpy())
        if v.size:
            ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=f"{tier} (n={v.size})")
            drawn += 1
    ax.set_xlabel("cold-start latency (s)")
    ax.set_ylabel("fraction of cold-start requests")
    ax.set_title(title or "Cold-start latency by source tier")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no cold starts", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cost_breakdown(summary: dict[str, Any], path: Path, title: str = "") -> Path:
    """Bar chart of the run's cost by component (GPU, storage, egress)."""
    parts = summary.get("cost_breakdown_usd") or {}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(parts)
    ax.bar(names, [parts[n] for n in names], color=["#4c72b0", "#55a868", "#c44e52"][: len(names)])
    ax.set_ylabel("USD")
    ax.set_title(title or f"Cost breakdown (total ${summary.get('cost_usd', 0):.2f})")
    for i, n in enumerate(names):
        ax.annotate(f"${parts[n]:.2f}", (i, parts[n]), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


SWEEP_MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "*")
#: Axis labels for the sweep table's usual columns (others are labelled with the column name).
SWEEP_LABELS: dict[str, str] = {
    "cost_usd": "cost of the run (USD)", "cold_start_s.mean": "mean cold start (s)",
    "cold_start_s.p99": "p99 cold start (s)", "ttft_s.p99": "p99 TTFT (s)", "ttft_s.p50": "median TTFT (s)",
    "slo_attainment": "TTFT SLO attainment", "availability": "availability",
}


def sweep_scatter(df: pd.DataFrame, path: Path, *, x: str = "cost_usd", y: str = "cold_start_s.mean",
                  hue: str = "policy", facet: str = "tiers", marker: str = "cluster.spot_share",
                  title: str = "") -> Path:
    """One point per job of a gathered sweep (experiments.gather): `y` against `x`, coloured by `hue`,
    one panel per value of `facet`, marker shape by `marker`. A grouping column the table lacks is
    simply not used (one panel, one colour or one marker)."""
    for col in (x, y):
        if col not in df.columns:
            raise ValueError(f"sweep plot: no column {col!r} in the sweep table; columns: {sorted(map(str, df))}")
    # values in sweep order (the table is sorted by job number), so panels follow the command line
    groups = {k: (list(pd.unique(df[c])) if c in df.columns else [None]) for k, c in
              (("hue", hue), ("facet", facet), ("marker", marker))}
    if len(groups["marker"]) > len(SWEEP_MARKERS):
        raise ValueError(f"sweep plot: {marker!r} has {len(groups['marker'])} values, at most "
                         f"{len(SWEEP_MARKERS)} marker shapes")
    colors = plt.get_cmap("tab10")
    n = len(groups["facet"])
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 1.8, 3.8), sharex=True, sharey=True, squeeze=False)
    for ax, fval in zip(axes[0], groups["facet"], strict=True):
        part = df if fval is None else df[df[facet] == fval]
        for hi, hval in enumerate(groups["hue"]):
            for mi, mval in enumerate(groups["marker"]):
                sel = part
                if hval is not None:
                    sel = sel[sel[hue] == hval]
                if mval is not None:
                    sel = sel[sel[marker] == mval]
                ax.scatter(sel[x], sel[y], color=colors(hi % 10), marker=SWEEP_MARKERS[mi], s=46,
                           edgecolors="black", linewidths=0.4)
        ax.set_title(f"{facet} = {fval}" if fval is not None else (title or "sweep"), fontsize=10)
        ax.set_xlabel(SWEEP_LABELS.get(x, x))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(SWEEP_LABELS.get(y, y))
    handles = [plt.Line2D([], [], linestyle="", marker="o", color=colors(i % 10), label=f"{hue} = {v}")
               for i, v in enumerate(groups["hue"]) if v is not None]
    handles += [plt.Line2D([], [], linestyle="", marker=SWEEP_MARKERS[i], color="gray", label=f"{marker} = {v}")
                for i, v in enumerate(groups["marker"]) if v is not None]
    if handles:
        fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    if title and groups["facet"] != [None]:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / (4.2 * n + 1.8), 1) if handles else None)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def claim_lines(path: Path, x: Sequence[float], series: Mapping[str, Sequence[float | None]], *, xlabel: str,
                ylabel: str, title: str, hlines: Mapping[str, float] | None = None,
                band: tuple[float, float] | None = None, vline: tuple[str, float] | None = None,
                logx: bool = False, logy: bool = False) -> Path:
    """A claims-audit sweep: one line per series over `x` (None = no point), the claim's thresholds as
    dashed `hlines` (label -> y), its range as a shaded `band`, and the scenario's setting as `vline`."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, ys in series.items():
        pts = [(a, b) for a, b in zip(x, ys, strict=True) if b is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", markersize=3.5, label=label)
    colors = plt.get_cmap("tab10")
    for i, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, linestyle="--", linewidth=1.0, color=colors(i % 10), alpha=0.8, label=label)
    if band is not None:
        ax.axhspan(*band, color="green", alpha=0.12, label=f"claimed range {band[0]:g}-{band[1]:g}")
    if vline is not None:
        ax.axvline(vline[1], color="gray", linestyle=":", label=vline[0])
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    if logx and len(x) <= 12:  # few sweep points: label exactly those
        ax.set_xticks(list(x), [f"{v:g}" for v in x])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def claim_bars(path: Path, groups: Sequence[str], series: Mapping[str, Sequence[float | None]], *, ylabel: str,
               title: str, hlines: Mapping[str, float] | None = None,
               bands: Mapping[str, tuple[float, float]] | None = None, logy: bool = False) -> Path:
    """A claims-audit comparison: grouped bars (one group per scenario, one bar per series; None = no
    bar), the claim's thresholds as dashed `hlines` and its ranges as shaded `bands` (label -> (lo, hi))."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2.5), 4.2))
    width = 0.8 / max(1, len(series))
    for i, (label, ys) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [0.0 if y is None else y for y in ys], width=width, label=label)
    colors = plt.get_cmap("Set2")
    for i, (label, (lo, hi)) in enumerate((bands or {}).items()):
        ax.axhspan(lo, hi, color=colors(i % 8), alpha=0.3, label=label, zorder=0)
    for label, y in (hlines or {}).items():
        ax.axhline(y, color="black", linestyle="--", linewidth=1.0, label=label)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log" if logy else "linear")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ notebooks (notebooks/*.ipynb): draw on an Axes


def box_quantiles(ax: plt.Axes, groups: Mapping[str, Sequence[float]], *, ylabel: str, logy: bool = True,
                  title: str = "") -> plt.Axes:
    """One box per group (whiskers at p1 and p99, no fliers), its size, p50 and p99 under its name; empty
    groups are left out."""
    arrays = {k: np.asarray(v, dtype=float) for k, v in groups.items()}
    data = {k: v[~np.isnan(v)] for k, v in arrays.items() if (~np.isnan(v)).any()}
    if not data:
        raise ValueError("box_quantiles: every group is empty")
    ax.boxplot(list(data.values()), whis=(1, 99), showfliers=False)
    names = []
    for k, v in data.items():
        p50, p99 = np.quantile(v, [0.5, 0.99])
        names.append(f"{k}\nn={v.size}\np50 {p50:.3g} s\np99 {p99:.3g} s")
    ax.set_xticks(range(1, len(data) + 1), names, fontsize=7)
    ax.set_yscale("log" if logy else "linear")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y", which="both")
    return ax


def ecdf_lines(ax: plt.Axes, groups: Mapping[str, Sequence[float]], *, xlabel: str, logx: bool = True,
               title: str = "") -> plt.Axes:
    """Empirical CDF of each group's values (NaNs dropped), one step line per group, labelled with its size."""
    for label, values in groups.items():
        v = np.asarray(values, dtype=float)
        v = np.sort(v[~np.isnan(v)])
        if v.size:
            ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=f"{label} (n={v.size})")
    ax.set_xscale("log" if logx else "linear")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return ax


def quantile_lines(ax: plt.Axes, df: pd.DataFrame, x: str, y: str, hue: str, *,
                   quantiles: Sequence[float] = (0.5, 0.99), xlabel: str = "", ylabel: str = "",
                   logx: bool = True, logy: bool = True, title: str = "") -> plt.Axes:
    """For each value of `hue`, the `quantiles` of `y` at each value of `x`: one colour per hue value, a
    line style per quantile (solid for the first)."""
    colors = plt.get_cmap("tab10")
    styles = ("-", "--", ":", "-.")
    for i, (hval, part) in enumerate(df.groupby(hue, sort=False)):
        stats = part.groupby(x)[y].quantile(list(quantiles)).unstack()
        for j, q in enumerate(quantiles):
            ax.plot(stats.index, stats[q], styles[j % len(styles)], marker="o", markersize=3,
                    color=colors(i % 10), label=f"{hval} p{q * 100:g}")
    ax.set_xscale("log" if logx else "linear")
    xs = np.sort(df[x].dropna().unique())
    if len(xs) <= 12:  # few sizes: tick each one, without the log axis's minor labels
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yscale("log" if logy else "linear")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return ax


def stacked_bars(ax: plt.Axes, table: pd.DataFrame, *, ylabel: str, labels: Mapping[str, str] | None = None,
                 title: str = "", totals: bool = True, fmt: str = "{:.3g}") -> plt.Axes:
    """One bar per row of `table`, its columns stacked bottom to top (legend names from `labels`), the
    row's total written on top."""
    bottom = np.zeros(len(table))
    colors = plt.get_cmap("tab10")
    for i, col in enumerate(table.columns):
        vals = table[col].fillna(0.0).to_numpy(dtype=float)
        ax.bar(range(len(table)), vals, bottom=bottom, color=colors(i % 10), label=(labels or {}).get(col, col))
        bottom += vals
    if totals:
        for i, total in enumerate(bottom):
            ax.annotate(fmt.format(total), (i, total), ha="center", va="bottom", fontsize=7)
    if bottom.size and bottom.max() > 0:  # room for the totals (zero-height segments pin the autoscaled top)
        ax.set_ylim(0, bottom.max() * 1.1)
    ax.set_xticks(range(len(table)), [str(i) for i in table.index], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)  # beside: bars stay visible
    return ax


def grouped_bars(ax: plt.Axes, table: pd.DataFrame, *, ylabel: str, legend_title: str = "", title: str = "",
                 fmt: str = "{:.3g}") -> plt.Axes:
    """One group of bars per row of `table`, one bar per column, each bar's value written on it."""
    width = 0.8 / max(1, table.shape[1])
    for i, col in enumerate(table.columns):
        xs = np.arange(len(table)) + (i - (table.shape[1] - 1) / 2) * width
        vals = table[col].to_numpy(dtype=float)
        ax.bar(xs, vals, width=width, label=str(col))
        for xv, v in zip(xs, vals, strict=True):
            if np.isfinite(v):
                ax.annotate(fmt.format(v), (xv, v), ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(table)), [str(i) for i in table.index], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(title=legend_title or None, fontsize=7, title_fontsize=7)
    return ax


def frontier_scatter(ax: plt.Axes, df: pd.DataFrame, x: str, y: str, front: pd.Series, *, hue: str,
                     label_cols: Sequence[str] = (), xlabel: str = "", ylabel: str = "", title: str = "") -> plt.Axes:
    """Every row as a point (`y` against `x`, coloured by `hue`), the rows where `front` is true joined
    by a line in order of `x`, ringed and labelled with their `label_cols` values."""
    colors = plt.get_cmap("tab10")
    for i, (hval, part) in enumerate(df.groupby(hue, sort=False)):
        ax.scatter(part[x], part[y], color=colors(i % 10), s=30, alpha=0.8, label=f"{hue} = {hval}")
    on = df[front.reindex(df.index, fill_value=False)].sort_values(x)
    ax.plot(on[x], on[y], "-", color="black", linewidth=1.0, label="Pareto front")
    ax.scatter(on[x], on[y], s=110, facecolors="none", edgecolors="black", linewidths=1.2)
    for _, row in on.iterrows():
        ax.annotate(", ".join(str(row[c]) for c in label_cols), (row[x], row[y]), textcoords="offset points",
                    xytext=(5, 5), fontsize=7)
    ax.set_xlabel(xlabel or SWEEP_LABELS.get(x, x))
    ax.set_ylabel(ylabel or SWEEP_LABELS.get(y, y))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ax
