"""Cost model: GPU time, storage and egress, and each request's share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from core.metrics import union_length_s
from core.specs import LOCAL_TIERS, ClusterSpec, ModelSpec
from core.units import GB, HOUR_S, MONTH_S

#: Instance-table events that end an instance: unloaded, or lost with its node.
END_EVENTS: tuple[str, ...] = ("stopped", "preempted", "failed")


def instance_lifetimes(instances: pd.DataFrame, end_s: float) -> pd.DataFrame:
    """One row per instance: node, model, gpus, gpu_bytes, start_s, stop_s (end_s if never stopped)."""
    if instances.empty:
        return pd.DataFrame(columns=["instance", "node", "model", "gpus", "gpu_bytes", "weights_bytes",
                                     "start_s", "stop_s"])
    starts = instances[instances["event"] == "loading"].set_index("instance")
    stops = instances[instances["event"].isin(END_EVENTS)].set_index("instance")["time_s"]
    out = starts[["node", "model", "gpus", "gpu_bytes", "weights_bytes"]].copy()
    out["start_s"] = starts["time_s"]
    out["stop_s"] = stops.reindex(out.index).fillna(end_s).clip(upper=end_s)
    return out.reset_index()


def gpu_cost(lifetimes: pd.DataFrame, cluster: ClusterSpec,
             gpu_ids: Mapping[str, Sequence[int]] | None = None) -> tuple[float, float]:
    """(GPU-hours, USD) of the GPUs held by instances over their lifetimes.

    With `gpu_ids` (instance -> the GPU indices it holds on its node) a GPU is billed once for the
    union of the times any instance held it: small instances packed onto one GPU do not each pay for
    the whole GPU. Without, every instance pays for `gpus` whole GPUs (an upper bound).
    """
    if lifetimes.empty:
        return 0.0, 0.0
    price = {n.name: n.usd_per_gpu_hour for n in cluster.nodes}
    if gpu_ids is None:
        hours = lifetimes["gpus"] * (lifetimes["stop_s"] - lifetimes["start_s"]) / HOUR_S
        usd = hours * lifetimes["node"].map(price).astype(float)
        return float(hours.sum()), float(usd.sum())
    by_node = gpu_hours_by_node(lifetimes, gpu_ids)
    return sum(by_node.values()), sum(h * price[node] for node, h in by_node.items())


def gpu_hours_by_node(lifetimes: pd.DataFrame, gpu_ids: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """GPU-hours per node: for each GPU, the union of the times any instance held it."""
    held: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for row in lifetimes.itertuples(index=False):
        for gpu in gpu_ids.get(row.instance, range(int(row.gpus))):
            held.setdefault((row.node, int(gpu)), []).append((float(row.start_s), float(row.stop_s)))
    out: dict[str, float] = {}
    for (node, _gpu), spans in sorted(held.items()):
        out[node] = out.get(node, 0.0) + union_length_s(spans) / HOUR_S
    return out


def storage_cost_by_tier(moves: pd.DataFrame, cluster: ClusterSpec, models: Sequence[ModelSpec],
                         end_s: float, start_s: float = 0.0) -> dict[str, float]:
    """USD of storage per tier from `start_s` (a warm-up's end) to `end_s`: "cloud" is the whole catalog in
    every object store; each local tier is GB-months held (from a copy landing until its eviction or loss,
    counted from `start_s` on) x the tier's price."""
    catalog_gb = sum(m.weights_bytes for m in models) / GB
    span_s = end_s - start_s if start_s else end_s
    out = {"cloud": sum(catalog_gb * s.price_usd_per_gb_month * span_s / MONTH_S for s in cluster.stores)}
    out.update({t: 0.0 for t in LOCAL_TIERS if any(t in n.tiers for n in cluster.nodes)})
    prices = {(n.name, t.name): t.price_usd_per_gb_month for n in cluster.nodes for t in n.tiers.values()}
    if moves.empty or not any(prices.values()):
        return out
    held: dict[tuple[str, str, str], float] = {}
    for row in moves.sort_values("end_s").itertuples(index=False):
        if not row.to_tier:  # an eviction, or a copy lost with its node: it leaves the tier
            start = held.pop((row.node, row.from_tier, row.model), None)
            if start is not None and start_s:
                start = min(max(start, start_s), row.time_s)  # only the part after the warm-up
            if start is not None:
                out[row.from_tier] += (prices.get((row.node, row.from_tier), 0.0) * row.bytes / GB
                                       * (row.time_s - start) / MONTH_S)
        else:
            held[(row.node, row.to_tier, row.model)] = row.end_s
    by_model = {m.name: m.weights_bytes for m in models}
    for (node, tier, model), start in held.items():
        if start_s:
            start = min(max(start, start_s), end_s)
        out[tier] += prices.get((node, tier), 0.0) * by_model.get(model, 0.0) / GB * (end_s - start) / MONTH_S
    return out


def egress_cost(bytes_by_route: Mapping[tuple[str, str], float], cluster: ClusterSpec) -> float:
    """USD of bytes fetched from object stores, keyed by (store name, cloud of the fetching node): a store
    charges its egress price on bytes leaving its cloud; inside its cloud the transfer is free."""
    stores = {s.name: s for s in cluster.stores}
    usd = 0.0
    for (store_name, node_cloud), nbytes in sorted(bytes_by_route.items()):
        store = stores[store_name]
        if node_cloud != store.cloud:
            usd += nbytes / GB * store.egress_usd_per_gb
    return usd


def fleet_cost(up_s_by_node: Mapping[str, float], cluster: ClusterSpec) -> tuple[float, float]:
    """(node-hours, USD) of keeping the nodes provisioned for `up_s_by_node` seconds each, spot nodes
    at their spot price: the bill of a reserved fleet, whatever its GPUs did (`gpu_cost` bills only
    the GPU-time instances held)."""
    hours = usd = 0.0
    for node in cluster.nodes:
        h = up_s_by_node.get(node.name, 0.0) / HOUR_S
        hours += h
        usd += h * node.usd_per_hour
    return hours, usd


def request_cost_shares(requests: pd.DataFrame, lifetimes: pd.DataFrame, cluster: ClusterSpec,
                        scale: float = 1.0) -> np.ndarray:
    """Each request's share of its instance's GPU cost (whole GPUs x lifetime x `scale`), split by tokens
    served. `scale` < 1 spreads the saving of instances sharing GPUs (`gpu_cost` with ids / without)."""
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
    out[:] = usd.to_numpy() * share * scale
    return out
