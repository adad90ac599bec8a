"""Assigning model ids to requests by a Zipf popularity law, and measuring popularity."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from core.errors import ConfigError
from core.workload.rng import streams
from core.workload.trace import UNASSIGNED, Workload


def zipf_weights(n: int, s: float) -> np.ndarray:
    """Probabilities ``p_i ∝ 1/i^s`` for ranks ``i = 1..n`` (s = 0 is uniform)."""
    if n < 1:
        raise ConfigError(f"model_ids: need at least one model, got {n}")
    if not (math.isfinite(s) and s >= 0):
        raise ConfigError(f"zipf_s: must be finite and >= 0, got {s}")
    w = np.arange(1, n + 1, dtype=np.float64) ** -s
    return w / w.sum()


def assign_models(
    wl: Workload, model_ids: Sequence[str], zipf_s: float, seed: int, only_unassigned: bool = True
) -> Workload:
    """Give requests a model id drawn i.i.d. from Zipf(``zipf_s``) over ``model_ids`` (rank 1 = first id).

    With ``only_unassigned`` (default) requests that already have a model keep it.
    """
    ids = np.asarray(list(model_ids), dtype=object)
    if any(not isinstance(m, str) or m == UNASSIGNED for m in ids):
        raise ConfigError(f"model_ids: must be non-empty strings, got {list(model_ids)!r}")
    p = zipf_weights(ids.size, zipf_s)
    (rng,) = streams(seed, 1)
    target = wl.model == UNASSIGNED if only_unassigned else np.ones(len(wl), dtype=bool)
    model = wl.model.copy()
    model[target] = ids[rng.choice(ids.size, size=int(target.sum()), p=p)]
    return wl.with_columns(model=model)


def popularity(wl: Workload) -> dict[str, int]:
    """Requests per model id, most popular first (unassigned requests count under ``""``)."""
    counts = pd.Series(wl.model, dtype=object).value_counts(sort=True)
    return {str(k): int(v) for k, v in counts.items()}
