"""The twin's figure: per request, sim vs live cold-start latency and TTFT (with y = x), and the CDFs of both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

PANELS: tuple[tuple[str, str], ...] = (("cold_start_s", "cold-start latency (s)"), ("ttft_s", "TTFT (s)"))


def _finite(values: pd.Series) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    return np.sort(a[np.isfinite(a)])


def twin_figure(joined: pd.DataFrame, path: Path, title: str) -> Path:
    """A 2 x 2 figure into `path` (png): top row sim vs live scatter per request, bottom row the CDFs."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    both = joined[joined["in_live"] & joined["in_sim"]]
    for col, (metric, label) in enumerate(PANELS):
        ax = axes[0][col]
        x = both[f"{metric}_live"].astype(float).to_numpy()
        y = both[f"{metric}_sim"].astype(float).to_numpy()
        ok = np.isfinite(x) & np.isfinite(y)
        ax.scatter(x[ok], y[ok], s=14, alpha=0.7)
        hi = float(max(np.max(x[ok], initial=0.0), np.max(y[ok], initial=0.0), 1e-3)) * 1.05
        pos = np.concatenate([x[ok], y[ok]])
        lo = float(pos.min()) if pos.size else 0.0
        if lo > 0 and hi / lo > 20:  # warm (ms) and cold (s) requests together: log axes show both
            lo *= 0.8
            ax.set(xscale="log", yscale="log")
        else:
            lo = 0.0
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel=f"live {label}", ylabel=f"sim {label}",
               title=f"{label}: {int(ok.sum())} requests")
        ax.legend(loc="upper left")
        ax = axes[1][col]
        for world in ("live", "sim"):
            v = _finite(joined.loc[joined[f"in_{world}"], f"{metric}_{world}"])
            if v.size:
                ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=f"{world} (n={v.size})")
        ax.set(xlabel=label, ylabel="CDF", ylim=(0, 1.02), xscale=axes[0][col].get_xscale())
        ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
