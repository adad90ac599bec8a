"""What the gateway records: one row per request in `core.records.REQUEST_SCHEMA`, instance lifecycle events in
`INSTANCE_SCHEMA`, each request's cost, and the JSON form served by GET /admin/records.

Cost (`cost_usd`) follows the simulator's rule (`core.cost.request_cost_shares`): an instance costs
`node $/h x GPU-equivalents it holds x its lifetime in hours` (from the start of its load to its stop, or to
now while it runs), split among the requests it completed in proportion to their tokens (prompt + output).
GPU-equivalents are the bytes the instance reserves over one GPU's memory (on CPU nodes: of the nominal GPU),
so engines sharing a node share its price. Requests that were rejected or failed cost 0, and an instance's
idle time is paid by the requests it served, as in the simulator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.cost import instance_lifetimes, request_cost_shares
from core.records import INSTANCE_SCHEMA, REQUEST_SCHEMA, frame, rows_to_columns, write_table
from core.specs import ClusterSpec
from core.state import InstanceState
from core.variants import VARIANT_SEP
from live.registry_versions import check_revision

#: the request header naming the client's region (core/regions.py): the policy routes by it and, when the
#: bundle's placement has a region table, the gateway waits the client <-> node round trip before forwarding
CLIENT_REGION_HEADER = "x-tierlab-client-region"


@dataclass
class RequestInfo:
    """What a policy may read of a request (`core.policies.base.RequestView`), plus what the gateway records."""

    id: int
    model: str
    tenant: str
    prompt_tokens: int
    output_tokens: int
    arrival_s: float
    queue_s: float = 0.0
    cold_start: bool = False
    source_tier: str = ""
    fetch_s: float = math.nan
    to_gpu_s: float = math.nan
    engine_init_s: float = math.nan
    cold_start_s: float = math.nan
    prefill_s: float = math.nan
    ttft_s: float = math.nan  # arrival -> the first chunk standing for a token (`gateway_sse.token_choice`)
    tpot_s: float = math.nan
    e2e_s: float = math.nan
    last_token_s: float = math.nan  # arrival -> the last such chunk (streams only; not a REQUEST_SCHEMA column)
    out_tokens: int = 0
    in_tokens: int = 0
    node: str = ""
    instance: str = ""
    outcome: str = "failed"
    reason: str = ""
    token_stream: bool = False  # tokens were relayed as the engine produced them (TPOT is measurable)
    finished: bool = False
    cache: str = ""  # "exact" / "semantic" when the response cache answered (`live.gateway_cache`)
    cache_slot: Any = None  # its `live.gateway_cache.CacheSlot` when cacheable and the cache is on (not recorded)
    # prefix caching: the prompt's block keys for cache-aware placement (`core.prefix_cache`), and the prompt
    # tokens the engine reported it served from its prefix cache
    prefix_blocks: tuple[int, ...] = ()
    cached_tokens: int = 0
    variant: str = ""  # the weight format that served it ("": `served_variant(model)`, the deployment's name says)
    client_region: str = ""  # the client's region (core/regions.py; "" = regions off)
    network_s: float = math.nan  # the emulated client <-> agent region round trip, included in ttft_s / e2e_s


def served_variant(model: str) -> str:
    """The weight variant a deployment name carries: `fmt` of `name@fmt` (`core.variants.variant_name`, a
    `live.quantize` copy), "" for a plain name or a registry pin `name@<revision id>`."""
    _, sep, fmt = model.partition(VARIANT_SEP)
    if not sep:
        return ""
    try:
        check_revision(fmt)
    except ValueError:
        return fmt
    return ""


def tpot(last_token_s: float, ttft_s: float, out_tokens: int) -> float:
    """Mean time per output token after the first, (last token - first token) / (tokens - 1), both times from
    arrival (the first and last chunks that stand for tokens); NaN when not measurable."""
    if out_tokens < 2 or math.isnan(ttft_s) or math.isnan(last_token_s):
        return math.nan
    return max(0.0, last_token_s - ttft_s) / (out_tokens - 1)


def cached_prompt_tokens(usage: Mapping[str, Any]) -> int:
    """Prompt tokens the engine served from its prefix cache: OpenAI's `usage.prompt_tokens_details.cached_tokens`
    (the CPU engine's prefix cache reports it; vLLM too); 0 when absent."""
    details = usage.get("prompt_tokens_details")
    value = details.get("cached_tokens") if isinstance(details, Mapping) else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def apply_load_timings(req: RequestInfo, timings: Mapping[str, Any]) -> None:
    """Copy an agent's /load timings onto a cold request: fetch (the hops plus the engine's read), to GPU, init."""
    hops = timings.get("fetch_s") or []
    read = timings.get("read_s")  # the engine's own read of its tier into host memory, when known
    parts = [float(h.get("duration_s", 0.0)) for h in hops] + ([float(read)] if read is not None else [])
    req.fetch_s = float(sum(parts)) if parts else math.nan
    to_gpu = timings.get("to_gpu_s")
    req.to_gpu_s = float(to_gpu) if isinstance(to_gpu, int | float) else math.nan  # NaN on CPU engines
    # ready_s counts from the engine's start() (EngineHandle.wait_ready), so it already holds engine_start_s
    ready = timings.get("ready_s", timings.get("engine_start_s"))
    req.engine_init_s = float(ready) if isinstance(ready, int | float) else math.nan
    if timings.get("fallback_from") and isinstance(timings.get("source_tier"), str):
        req.source_tier = timings["source_tier"]  # the placed tier was full: loaded from here instead


def request_row(req: RequestInfo) -> tuple[Any, ...]:
    """`req` as a REQUEST_SCHEMA row; cost_usd is NaN here and filled in by `request_frame`."""
    return (req.id, req.tenant, req.model, req.arrival_s, req.queue_s, req.cold_start, req.source_tier,
            req.fetch_s, req.to_gpu_s, req.engine_init_s, req.cold_start_s, req.prefill_s, req.ttft_s, req.tpot_s,
            req.e2e_s, req.in_tokens or req.prompt_tokens, req.out_tokens, req.node, req.instance, req.outcome,
            req.reason, math.nan, req.cache, req.cached_tokens, req.variant or served_variant(req.model),
            req.client_region, req.network_s)


def instance_event(time_s: float, inst: InstanceState, event: str, reason: str = "") -> tuple[Any, ...]:
    """An INSTANCE_SCHEMA row: `inst` entering `event` (loading, ready, stopped) at `time_s`."""
    return (time_s, inst.id, inst.model.name, inst.node, event, inst.source_tier, len(inst.gpu_ids),
            inst.gpu_bytes, inst.model.weights_bytes, reason)


def instance_frame(events: Sequence[tuple[Any, ...]]) -> pd.DataFrame:
    return frame(INSTANCE_SCHEMA, rows_to_columns(INSTANCE_SCHEMA, events))


def request_frame(rows: Sequence[tuple[Any, ...]], events: Sequence[tuple[Any, ...]], cluster: ClusterSpec,
                  now_s: float) -> pd.DataFrame:
    """The request table with each completed request's cost share (see the module docstring)."""
    df = frame(REQUEST_SCHEMA, rows_to_columns(REQUEST_SCHEMA, rows))
    if df.empty:
        return df
    lifetimes = instance_lifetimes(instance_frame(events), now_s)
    if not lifetimes.empty:
        gpu_mem = {n.name: n.gpu.mem_bytes for n in cluster.nodes}
        # GPU-equivalents, not whole GPUs: several CPU engines share one nominal GPU and its node's price
        lifetimes["gpus"] = lifetimes["gpu_bytes"] / lifetimes["node"].map(gpu_mem).astype(float)
    df["cost_usd"] = request_cost_shares(df, lifetimes, cluster)
    return df


def _jsonable(value: Any) -> Any:
    if value is None or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    return value


def records_json(df: pd.DataFrame) -> dict[str, Any]:
    """`{"columns": [...], "rows": [[...], ...]}` in the frame's column order; NaN and NA become null."""
    return {"columns": list(df.columns),
            "rows": [[_jsonable(v) for v in row] for row in df.itertuples(index=False, name=None)]}


def write_request_records(out_dir: str | Path, df: pd.DataFrame) -> Path:
    """`out_dir/records.parquet` (written through a temp name: never a partial file); the path."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"records directory {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return write_table(out / "records.parquet", df)
