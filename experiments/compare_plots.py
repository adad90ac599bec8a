"""Figures of the policy comparison: cold-start CDFs per policy and source tier, cost vs p99 TTFT front."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs write files, never open windows
import matplotlib.pyplot as plt
import numpy as np

from core.specs import TIER_ORDER
from experiments.compare import Run


def _save(fig: Any, path: Path) -> Path:
    # written whole or not at all: a reader never sees half a png
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def cdf_figure(runs: Sequence[Run], policies: Sequence[str], path: Path, title: str = "") -> Path:
    """One panel for all cold starts, then one per source tier that served any; one line per policy (the
    cold starts of every seed pooled)."""
    tiers = [t for t in TIER_ORDER if any(tier == t for r in runs for _, tier in r.cold)]
    panels = ["all", *tiers]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels, strict=True):
        for k, policy in enumerate(policies):
            v = np.sort([s for r in runs if r.policy == policy for s, t in r.cold if panel in ("all", t)])
            if v.size:  # one colour per policy in every panel (and in the front figure)
                ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", color=f"C{k}",
                        label=f"{policy} (n={v.size})")
        ax.set_title(f"{title}: {panel}" if title else panel, fontsize=9)
        ax.set_xlabel("cold-start latency (s)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.set_xscale("log")  # dram loads take seconds, cloud loads minutes
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("fraction of cold-start requests")
    fig.tight_layout()
    return _save(fig, path)


def front_figure(estimates: Mapping[str, Mapping[str, Any]], policies: Sequence[str], path: Path,
                 title: str = "") -> Path:
    """Cost vs p99 TTFT, one point per policy (mean over seeds, 95% intervals as error bars); the policies
    that no other beats on both axes (the front) are joined by a line."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    pts = []
    for k, policy in enumerate(policies):
        c, t = estimates[policy]["cost_usd"], estimates[policy]["ttft_p99_s"]
        if c.value is None or t.value is None:
            continue
        xerr = [[c.value - c.lo], [c.hi - c.value]] if c.lo is not None else None
        yerr = [[t.value - t.lo], [t.hi - t.value]] if t.lo is not None else None
        ax.errorbar(c.value, t.value, xerr=xerr, yerr=yerr, fmt="o", capsize=3, color=f"C{k}", label=policy)
        pts.append((c.value, t.value))
    front = sorted(p for p in pts if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts))
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="front")
    ax.set_xlabel("cost (USD per run)")
    ax.set_ylabel("p99 TTFT (s)")
    ax.set_title(f"Cost vs p99 TTFT: {title}" if title else "Cost vs p99 TTFT", fontsize=10)
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
