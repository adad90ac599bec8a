"""Plots of one run: cold-start CDF by source tier, cost breakdown."""

from __future__ import annotations

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
