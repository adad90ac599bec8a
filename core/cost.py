"""Cost model: GPU time, storage and egress, and each request's share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from core.specs import ClusterSpec, ModelSpec
from core.units import GB, HOUR_S, MONTH_S


def instance_lifetimes(instances: pd.DataFrame, end_s: float) -> pd.DataFrame:
    """One row per instance: node, model, gpus, gpu_bytes, start_s, stop_s (end_s if never stopped)."""
    if instances.empty:
        return pd.DataFrame(columns=["instance", "node", "model", "gpus", "gpu_bytes", "weights_bytes",
                                     "start_s", "stop_s"])
    starts = instances[instances["event"] == "loading"].set_index("instance")
    stops = instances[instances["event"] == "stopped"].set_index("instance")["time_s"]
    out = starts[["node", "model", "gpus", "gpu_bytes", "weights_bytes"]].copy()
    out["start_s"] = starts["time_s"]
    out["stop_s"] = stops.reindex(out.index).fillna(end_s).clip(upper=end_s)
    return out.reset_index()


def gpu_cost(lifetimes: pd.DataFrame, cluster: ClusterSpec) -> tuple[float, float]:
    """(GPU-hours, USD) of the GPUs held by instances over their lifetimes."""
    if lifetimes.empty:
        return 0.0, 0.0
    price = {n.name: n.usd_per_gpu_hour for n in cluster.nodes}
    hours = lifetimes["gpus"] * (lifetimes["stop_s"] - lifetimes["start_s"]) / HOUR_S
    usd = hours * lifetimes["node"].map(price).astype(float)
    return float(hours.sum()), float(usd.sum())


def storage_cost(moves: pd.DataFrame, cluster: ClusterSpec, models: Sequence[ModelSpec], end_s: float) -> float:
    """USD of storage: every model in the object store for the run, plus local tiers at their prices."""
    catalog_gb = sum(m.weights_bytes for m in models) / GB
    usd = catalog_gb * cluster.store.price_usd_per_gb_month * end_s / MONTH_S
    prices = {(n.name, t.name): t.price_usd_per_gb_month for n in cluster.nodes for t in n.tiers.values()}
    if moves.empty or not any(prices.values()):
        return usd
    held: dict[tuple[str, str, str], float] = {}
    for row in moves.sort_values("end_s").itertuples(index=False):
        if row.kind == "evict":
            start = held.pop((row.node, row.from_tier, row.model), None)
            if start is not None:
                usd += prices.get((row.node, row.from_tier), 0.0) * row.bytes / GB * (row.time_s - start) / MONTH_S
        else:
            held[(row.node, row.to_tier, row.model)] = row.end_s
    by_model = {m.name: m.weights_bytes for m in models}
    for (node, tier, model), start in held.items():
        usd += prices.get((node, tier), 0.0) * by_model.get(model, 0.0) / GB * (end_s - start) / MONTH_S
    return usd


def egress_cost(cloud_bytes: float, cluster: ClusterSpec) -> float:
    return cloud_bytes / GB * cluster.store.egress_usd_per_gb


def request_cost_shares(requests: pd.DataFrame, lifetimes: pd.DataFrame, cluster: ClusterSpec) -> np.ndarray:
    """Each request's share of its instance's GPU cost, split by tokens served."""
    out = np.zeros(len(requests))
    if requests.empty or lifetimes.empty:
        return out
    price = {n.name: n.usd_per_gpu_hour for n in cluster.nodes}
    inst_usd: Mapping[str, float] = dict(zip(
        lifetimes["instance"],
        lifetimes["gpus"] * (lifetimes["stop_s"] - lifetimes["start_s"]) / HOUR_S
        * lifetimes["node"].map(price).astype(float), strict=True))
    served = requests["outcome"] == "completed"
    tokens = (requests["prompt_tokens"] + requests["output_tokens"]).where(served, 0).astype(float)
    totals = tokens.groupby(requests["instance"]).transform("sum")
    usd = requests["instance"].map(inst_usd).astype(float).fillna(0.0)
    share = np.where(totals > 0, tokens / totals.where(totals > 0, 1.0), 0.0)
    out[:] = usd.to_numpy() * share
    return out
