"""What a live run leaves behind: records.parquet and summary.json with the simulator's keys, and a one-line summary."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from core.metrics import availability, prefix_cache_stats, summarize
from core.records import MOVE_SCHEMA, REQUEST_SCHEMA, frame, write_table

# summary keys the simulator measures that a live run cannot: present, null (fleet and storage accounting,
# injected faults, tier moves); the per-request ones are all measured
SIM_ONLY_KEYS = ("cloud_gb", "cloud_gb_by_store", "fleet_cost_usd", "fleet_node_hours", "gpu_hours_by_node",
                 "node_failures",
                 "preemptions", "requeued", "requeued_by_cause", "requeued_requests", "spot_nodes", "storage_usd",
                 "store_outages", "tier_moves", "policy", "workload", "models", "seed")


def live_summary(records: pd.DataFrame, *, wall_s: float, ttft_slo_s: float,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """`core.metrics.summarize` over live records: the simulator's keys, with what a live run cannot know as null.

    Cost is the sum of the records' `cost_usd` (the gateway's per-request share of its node's price);
    GPU-hours, memory waste and `SIM_ONLY_KEYS` are not measured live and are null; instances started and
    loads by tier count the instances that cold requests waited for. `sim_s` is the span of arrivals.
    """
    if list(records.columns) != list(REQUEST_SCHEMA):
        raise ValueError(f"records must have the request schema's columns {list(REQUEST_SCHEMA)}")
    cost = float(records["cost_usd"].fillna(0.0).sum())
    span_s = float(records["arrival_s"].max() - records["arrival_s"].min()) if len(records) else 0.0
    loads = records[records["cold_start"] & (records["instance"] != "")].drop_duplicates("instance")
    measured = {
        "mode": "live",
        "instances_started": len(loads),
        "loads_by_tier": {str(t): int(n) for t, n in loads["source_tier"].value_counts().items()},
        **availability(records, no_path_intervals=[], recoveries_s=[]),
        "unavailable_s": None,  # needs fault injection, which live runs do not do
        # the engines' prefix-cache hits, as the simulator reports them when its engine caches prefixes (0 when
        # no engine reported a cached token: the cache is off, or nothing repeated)
        **prefix_cache_stats(records),
    }
    return summarize(records, gpu_hours=math.nan, cost_usd=cost, cost_breakdown={"gpu": cost},
                     memory_waste_frac=math.nan, sim_s=span_s, wall_s=wall_s, ttft_slo_s=ttft_slo_s,
                     extra={**dict.fromkeys(SIM_ONLY_KEYS), **measured, **(extra or {})})


def moves_frame(moves: Sequence[Mapping[str, Any]], t0_unix: float) -> pd.DataFrame:
    """Agents' movement records (unix times) as a MOVE_SCHEMA table on the gateway's clock (seconds since t0)."""
    cols: dict[str, list[Any]] = {c: [] for c in MOVE_SCHEMA}
    for m in sorted(moves, key=lambda m: float(m["time_s"])):
        for c in MOVE_SCHEMA:
            v = m[c]
            cols[c].append(float(v) - t0_unix if c in ("time_s", "end_s") else v)
    return frame(MOVE_SCHEMA, cols)


def action_counts(actions: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Policy actions by kind and outcome (done / failed / skipped), e.g. {"copy": {"done": 3}}."""
    out: dict[str, dict[str, int]] = {}
    for (kind, outcome), n in actions.groupby(["kind", "outcome"]).size().items():
        out.setdefault(str(kind), {})[str(outcome)] = int(n)
    return out


def write_outputs(out_dir: str | os.PathLike[str], records: pd.DataFrame, summary: dict[str, Any],
                  moves: pd.DataFrame | None = None, instances: pd.DataFrame | None = None,
                  actions: pd.DataFrame | None = None) -> dict[str, Path]:
    """records.parquet (+ tier_moves.parquet, instances.parquet, actions.parquet when given) and summary.json in
    `out_dir`, each written through a temp name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"records": write_table(out / "records.parquet", records), "summary": out / "summary.json"}
    if moves is not None:
        paths["moves"] = write_table(out / "tier_moves.parquet", moves)
    if instances is not None:
        paths["instances"] = write_table(out / "instances.parquet", instances)
    if actions is not None:
        paths["actions"] = write_table(out / "actions.parquet", actions)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
    tmp.replace(paths["summary"])
    return paths


def one_line(summary: dict[str, Any], verb: str) -> str:
    """e.g. "served 40 requests in 61.2 s wall (seed_tiered: 40 completed, 0 rejected, 0 failed; 3 cold starts ...)"."""
    by_tier = summary.get("cold_start_by_tier") or {}
    tiers = ", ".join(f"{t} {v['count']}" for t, v in sorted(by_tier.items())) or "none"
    cs = (summary.get("cold_start_s") or {}).get("mean")
    ttft = (summary.get("ttft_s") or {}).get("p50")
    fmt = lambda x: "n/a" if x is None else f"{x:.2f} s"  # noqa: E731
    return (f"{verb} {summary['requests']} requests in {summary['wall_s']:.1f} s wall ({summary.get('policy', '?')}: "
            f"{summary['completed']} completed, {summary['rejected']} rejected, {summary['failed']} failed; "
            f"{summary['cold_starts']} cold starts ({tiers}), mean cold start {fmt(cs)}; p50 TTFT {fmt(ttft)}; "
            f"${summary['cost_usd']:.4f})")
