"""Run one simulation and turn what happened into the shared record tables and a summary."""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from core.cost import (
    egress_cost,
    fleet_cost,
    gpu_cost,
    gpu_hours_by_node,
    instance_lifetimes,
    request_cost_shares,
    storage_cost_by_tier,
)
from core.engine_start import ENGINE_START_SCHEMA
from core.inference import MeasuredTable
from core.initial_state import InitialState, final_state
from core.metrics import _clean, availability, memory_waste_frac, prefix_cache_stats, summarize
from core.policies.base import PolicyBundle
from core.records import INSTANCE_SCHEMA, MOVE_SCHEMA, REQUEST_SCHEMA, empty, frame, rows_to_columns
from core.regions import RegionSetup
from core.response_cache_model import SimCacheConfig, SimResponseCache, cache_summary, prompt_keys
from core.spec_builders import validate_fit
from core.specs import ClusterSpec, EngineSpec, ModelSpec
from core.workload.trace import Workload
from sim.faults import EVENT_SCHEMA
from sim.initial import seed_tiers
from sim.record_sink import RecordSink, StreamingWorld, busy_stand_ins
from sim.regions import attach as attach_regions
from sim.regions import network_columns
from sim.stream_summary import StreamedRequests
from sim.warmup import WarmupMark
from sim.world import World


@dataclass
class SimResult:
    requests: pd.DataFrame
    moves: pd.DataFrame
    instances: pd.DataFrame
    summary: dict[str, Any]
    # sim-only: faults, failovers and the store of every cloud transfer (`sim.faults.EVENT_SCHEMA`)
    events: pd.DataFrame = field(default_factory=lambda: empty(EVENT_SCHEMA))
    # per node, per local tier, the models held at the end (`core.initial_state.final_state`: final_state.json)
    final_state: dict[str, Any] = field(default_factory=dict)
    # sim-only: each engine start's phases (`core.engine_start.ENGINE_START_SCHEMA`)
    engine_starts: pd.DataFrame = field(default_factory=lambda: empty(ENGINE_START_SCHEMA))
    # streamed runs (`simulate_streamed`): `requests` is empty and the request table is this parquet file
    records_path: Path | None = None


def simulate(
    cluster: ClusterSpec,
    models: Sequence[ModelSpec],
    engine: EngineSpec,
    policy: PolicyBundle,
    workload: Workload,
    *,
    measured: Sequence[MeasuredTable] = (),
    request_timeout_s: float = 600.0,
    drain_timeout_s: float = 3600.0,
    ttft_slo_s: float = 10.0,
    progress: bool = False,
    seed: int = 0,
    warmup_s: float = 0.0,
    initial_state: InitialState | str | None = None,
    response_cache: SimCacheConfig | None = None,
    regions: RegionSetup | None = None,
    steady_state: str = "exact",
) -> SimResult:
    """Simulate `workload` on `cluster` under `policy`; deterministic for the same inputs and `seed`
    (which draws only the faults: spot preemptions, node failures, store outages).

    `warmup_s` > 0: requests arriving before it are left out of the request table and the summary, and costs
    count from then on (`sim.warmup`). `initial_state`: what the local tiers hold at time 0 (a checked
    `core.initial_state.InitialState`, or "policy"); None: empty. `response_cache`: the gateway's response
    cache as `core.response_cache_model` models it (None or disabled: off, and nothing changes). `regions`: client
    regions and inter-region RTTs (core.regions, sim.regions; None: off, and nothing changes). `steady_state`:
    "exact", or "fast" (warm requests decoded analytically, sim.steady_state; its summary counts them)."""
    validate_fit(cluster, models, engine)
    bar = None
    on_progress = None
    if progress and len(workload):
        from tqdm import tqdm

        bar = tqdm(total=len(workload), unit="req", desc="simulating", mininterval=0.5, leave=False)
        last = [0]

        def on_progress(_now: float, i: int) -> None:
            bar.update(i - last[0])
            last[0] = i

    t0 = time.perf_counter()
    with _quiet_gc():
        world, wall_s, mark = _run_world(cluster, models, engine, policy, workload, measured, request_timeout_s,
                                         drain_timeout_s, on_progress, t0, seed, warmup_s, initial_state,
                                         response_cache, regions, steady_state)
    if bar is not None:
        bar.update(len(workload) - bar.n)
        bar.close()
    return collect(world, models, cluster, wall_s, ttft_slo_s, policy.name, warmup=mark)


def simulate_streamed(
    cluster: ClusterSpec,
    models: Sequence[ModelSpec],
    engine: EngineSpec,
    policy: PolicyBundle,
    chunks: Iterable[Workload],
    stream_dir: str | Path,
    *,
    chunk_rows: int = 50_000,
    measured: Sequence[MeasuredTable] = (),
    request_timeout_s: float = 600.0,
    drain_timeout_s: float = 3600.0,
    ttft_slo_s: float = 10.0,
    progress: bool = False,
    seed: int = 0,
    initial_state: InitialState | str | None = None,
    expected_requests: float | None = None,
    steady_state: str = "exact",
) -> SimResult:
    """`simulate`, with the workload given as time-ordered chunks (e.g. `core.workload.horizon`) and the request
    records streamed to `<stream_dir>/records.parquet` every `chunk_rows` arrivals (`sim.record_sink`): memory
    follows the requests in flight, not those simulated. The summary equals `simulate`'s on the concatenated
    workload; `SimResult.requests` is empty and `records_path` names the file. No warm-up, regions or response
    cache (they need every request at the end). `expected_requests`: the progress bar's total (None: unknown)."""
    validate_fit(cluster, models, engine)
    world = StreamingWorld(cluster, models, engine, policy, measured=measured, request_timeout_s=request_timeout_s,
                           drain_timeout_s=drain_timeout_s, seed=seed, steady_state=steady_state)
    seed_tiers(world, initial_state)
    sink = RecordSink(stream_dir, chunk_rows)
    bar = None
    if progress:
        from tqdm import tqdm

        total = None if expected_requests is None else round(expected_requests)
        bar = tqdm(total=total, unit="req", desc="simulating (streamed)", mininterval=0.5, leave=False)
        last = [0]

        def on_progress(_now: float, i: int) -> None:
            bar.update(i - last[0])
            last[0] = i

        world.on_progress = on_progress
    t0 = time.perf_counter()
    with _quiet_gc():
        world.run_chunks(chunks, sink, request_columns, progress_every=20_000)
    wall_s = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return collect(world, models, cluster, wall_s, ttft_slo_s, policy.name, sink=sink)


@contextlib.contextmanager
def _quiet_gc() -> Iterator[None]:
    """Fewer garbage-collector passes while simulating.

    Requests, events and records live until the run ends, so the collector's repeated scans of
    them find nothing; freezing what exists and raising the young-generation threshold saves them.
    """
    gc.collect()
    gc.freeze()
    old = gc.get_threshold()
    gc.set_threshold(200_000, 50, 1000)
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def _run_world(cluster: ClusterSpec, models: Sequence[ModelSpec], engine: EngineSpec, policy: PolicyBundle,
               workload: Workload, measured: Sequence[MeasuredTable], request_timeout_s: float,
               drain_timeout_s: float, on_progress: Callable[[float, int], None] | None,
               t0: float, seed: int = 0, warmup_s: float = 0.0,
               initial_state: InitialState | str | None = None,
               response_cache: SimCacheConfig | None = None,
               regions: RegionSetup | None = None,
               steady_state: str = "exact") -> tuple[World, float, WarmupMark | None]:
    world = World(cluster, models, engine, policy, measured=measured, request_timeout_s=request_timeout_s,
                  drain_timeout_s=drain_timeout_s, on_progress=on_progress, seed=seed, steady_state=steady_state)
    if response_cache is not None and response_cache.cache.enabled:
        world.response_cache = SimResponseCache(response_cache)
        world.prompt_keys = prompt_keys(workload.prompt_tokens, getattr(workload, "prefix_blocks", None))
    if regions is not None:
        attach_regions(world, regions, workload.tenant, seed)
    seed_tiers(world, initial_state)
    mark = WarmupMark(world, warmup_s) if warmup_s > 0 else None
    world.run(workload.arrival_s, workload.model, workload.tenant, workload.prompt_tokens, workload.output_tokens,
              progress_every=20_000, prefix_blocks=workload.prefix_blocks)
    return world, time.perf_counter() - t0, mark


def request_columns(world: World, reqs: Sequence[Any] | None = None) -> dict[str, Any]:
    """The request table's columns from the world's request objects (`reqs`: these, e.g. a streamed batch;
    None: every request of the world)."""
    reqs = world.requests if reqs is None else reqs
    n = len(reqs)
    nan = math.nan
    cols: dict[str, Any] = {c: [None] * n for c in REQUEST_SCHEMA}
    loads = world.loads
    for k, r in enumerate(reqs):
        cols["request_id"][k] = r.id
        cols["tenant"][k] = r.tenant
        cols["model"][k] = r.model
        cols["arrival_s"][k] = r.arrival_s
        cols["prompt_tokens"][k] = r.prompt_tokens
        cols["output_tokens"][k] = r.output_tokens
        cols["outcome"][k] = r.outcome
        cols["reason"][k] = r.reason
        cols["node"][k] = r.node
        eng = r.instance
        inst_id = eng.state.id if eng is not None else ""
        cols["instance"][k] = inst_id
        cols["cold_start"][k] = r.cold
        done = r.outcome == "completed"
        ft = r.first_token_s if done else nan
        prefill = eng.inf.prefill_s(r.prompt_tokens - r.cached_tokens) if eng is not None else nan
        cols["prefill_s"][k] = prefill if done else nan
        cols["ttft_s"][k] = ft - r.arrival_s
        cols["e2e_s"][k] = r.finish_s - r.arrival_s if done else nan
        cols["tpot_s"][k] = (r.finish_s - ft) / (r.output_tokens - 1) if done and r.output_tokens > 1 else nan
        wait = (r.prefill_start_s - r.arrival_s) if done else nan
        if r.cold and inst_id in loads:
            ld = loads[inst_id]
            # the wait the load caused, counted from when the request was placed on the loading instance; the
            # request overhead is in TTFT, not in the load's wait (live: placement -> instance ready)
            cs = max(0.0, ft - r.placed_s - prefill - eng.inf.request_overhead_s) if done else nan
            cols["source_tier"][k] = ld.source_tier
            cols["fetch_s"][k] = ld.fetch_s
            cols["to_gpu_s"][k] = ld.to_gpu_s
            cols["engine_init_s"][k] = ld.engine_init_s
            cols["cold_start_s"][k] = cs
            cols["queue_s"][k] = max(0.0, wait - cs) if done else nan
        else:
            cols["source_tier"][k] = "gpu" if eng is not None else ""
            cols["fetch_s"][k] = cols["to_gpu_s"][k] = cols["engine_init_s"][k] = nan
            cols["cold_start_s"][k] = nan
            cols["queue_s"][k] = wait
        cols["cost_usd"][k] = 0.0
        cols["cache"][k] = r.cache
        if r.cache:  # answered whole by the gateway's cache: no token stream to time
            cols["tpot_s"][k] = nan
        cols["cached_tokens"][k] = r.cached_tokens if done else 0
        spec = world.state.models.get(r.model)
        cols["variant"][k] = spec.variant if spec is not None else ""
    if reqs is world.requests:
        network_columns(world, cols)  # sim.regions: client_region, network_s (the RTT, added to TTFT and e2e)
    else:  # a streamed batch (sim.record_sink; regions off there)
        cols["client_region"], cols["network_s"] = [""] * n, [nan] * n
    return cols


def collect(world: World, models: Sequence[ModelSpec], cluster: ClusterSpec, wall_s: float, ttft_slo_s: float,
            policy_name: str, warmup: WarmupMark | None = None, sink: RecordSink | None = None) -> SimResult:
    """The record tables and the summary of a finished run. `sink`: the run streamed its requests there
    (`sim.record_sink`): the request table is left empty, the summary's request statistics are read back from
    the file (`sim.stream_summary`), equal to the in-memory ones."""
    requests = frame(REQUEST_SCHEMA, request_columns(world)) if sink is None else empty(REQUEST_SCHEMA)
    moves = frame(MOVE_SCHEMA, rows_to_columns(MOVE_SCHEMA, world.moves))
    instances = frame(INSTANCE_SCHEMA, rows_to_columns(INSTANCE_SCHEMA, world.instance_rows))
    end_s = world.end_s
    lifetimes = instance_lifetimes(instances, end_s)
    events = frame(EVENT_SCHEMA, rows_to_columns(EVENT_SCHEMA, world.events))
    st = world.stats
    start_s = 0.0
    no_path = [*world.stores.gaps, *st.no_node_intervals]
    recoveries = world.stores.recoveries_s
    counted_moves, counted_instances, counted_events = moves, instances, events
    warm_extra: dict[str, Any] = {}
    if warmup is not None:  # only what came after the warm-up is measured (sim.warmup)
        m = warmup.measured(world, requests, lifetimes, moves, instances, events)
        requests, lifetimes, st, start_s = m.requests, m.lifetimes, m.stats, m.start_s
        no_path, recoveries = m.no_path_intervals, m.recoveries_s
        counted_moves, counted_instances, counted_events = m.moves, m.instances, m.events
        warm_extra = {"warmup_s": start_s, "warmup_requests": m.warmup_requests, "measured_s": end_s - start_s}
    gpu_hours, gpu_usd = gpu_cost(lifetimes, cluster, world.gpu_ids)
    whole_gpus_usd = gpu_cost(lifetimes, cluster)[1]
    share_scale = gpu_usd / whole_gpus_usd if whole_gpus_usd > 0 else 1.0
    streamed = None
    if sink is None:
        requests["cost_usd"] = request_cost_shares(requests, lifetimes, cluster, share_scale)
    else:
        streamed = StreamedRequests(sink.finish(lifetimes, cluster, share_scale), ttft_slo_s=ttft_slo_s)
        world.requests = busy_stand_ins(sink)  # what sim.memory reads of the dropped requests: their busy spans
    storage_usd_by_tier = storage_cost_by_tier(moves, cluster, models, end_s, start_s)
    storage_usd = sum(storage_usd_by_tier.values())
    egress_usd = egress_cost(st.cloud_bytes_by_route, cluster)
    waste = memory_waste_frac(st.reserved_byte_s, st.weights_byte_s, st.kv_byte_s)
    # spot nodes bill until they are reclaimed, failed ones until they fail; neither while gone
    node_hours, fleet_usd = fleet_cost(
        {n.name: end_s - start_s - st.node_down_s.get(n.name, 0.0) for n in cluster.nodes}, cluster)
    kinds = counted_events["kind"].value_counts()
    summary = summarize(
        requests,
        gpu_hours=gpu_hours,
        cost_usd=gpu_usd + storage_usd + egress_usd,
        cost_breakdown={"gpu": gpu_usd, **{f"storage_{t}": v for t, v in storage_usd_by_tier.items()},
                        "egress": egress_usd},
        memory_waste_frac=waste,
        # memory_waste_frac's parts and the GPU memory no instance held (sim.memory, docs/results/memory_waste.md)
        memory_waste_parts=world.memory.parts(st, start_s, end_s),
        sim_s=end_s,
        wall_s=wall_s,
        ttft_slo_s=ttft_slo_s,
        extra={
            "policy": policy_name,
            "loads_by_tier": dict(sorted(st.loads_by_tier.items())),
            "tier_moves": len(counted_moves),
            "cloud_gb": st.cloud_bytes / 1e9,
            "cloud_gb_by_store": _gb_by_store(st.cloud_bytes_by_route),
            "instances_started": int((counted_instances["event"] == "loading").sum()) if len(counted_instances)
            else 0,
            "storage_usd": storage_usd,
            "spot_nodes": sum(n.spot for n in cluster.nodes),
            "fleet_node_hours": node_hours,
            "gpu_hours_by_node": gpu_hours_by_node(lifetimes, world.gpu_ids),
            "fleet_cost_usd": fleet_usd,
            "preemptions": int(kinds.get("preempted", 0)),
            "node_failures": int(kinds.get("node_failed", 0)),
            "store_outages": int(kinds.get("store_out", 0)),
            "requeued": sum(st.requeued_by_cause.values()),
            "requeued_requests": len(st.requeued_ids),
            "requeued_by_cause": dict(sorted(st.requeued_by_cause.items())),
            **availability(requests, no_path_intervals=no_path, recoveries_s=recoveries),
            **warm_extra,
            # prefix caching only: off, the summary keeps its keys (and every result stays as it was)
            **(prefix_cache_stats(requests) if world.engine.prefix_cache else {}),
        },
    )
    if streamed is not None:  # the request statistics, from the file
        summary.update(_clean(streamed.summary_keys(gpu_usd + storage_usd + egress_usd, wall_s, ttft_slo_s)))
        summary["availability"] = streamed.availability()
        if world.engine.prefix_cache:
            summary.update(_clean(streamed.prefix_cache_stats()))
    if world.response_cache is not None:
        summary["response_cache"] = cache_summary(requests, world.response_cache.modelled)
    if world.steady is not None:  # fast mode: the requests decoded analytically (sim.steady_state)
        summary["steady_state_aggregated"] = world.steady.aggregated
    if warmup is not None:  # the simulator's speed: every request it simulated, measured or not
        summary["requests_per_wall_s"] = len(world.requests) / wall_s if wall_s > 0 else None
    starts = frame(ENGINE_START_SCHEMA, rows_to_columns(ENGINE_START_SCHEMA, world.starts.rows))
    return SimResult(requests=requests, moves=moves, instances=instances, summary=summary, events=events,
                     final_state=final_state(world.state, end_s), engine_starts=starts,
                     records_path=sink.path if sink is not None else None)


def _gb_by_store(bytes_by_route: dict[tuple[str, str], float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for (store, _cloud), nbytes in sorted(bytes_by_route.items()):
        out[store] = out.get(store, 0.0) + nbytes / 1e9
    return out
