"""The cluster description the gateway plans with, built from what each node agent reports on GET /status.

An agent reports (fields it lacks fall back to the nominal placeholders of `live.gateway_config`):

    tiers[name]: {capacity_bytes, read_Bps, write_Bps, latency_s}   read/write null = unpaced
    cloud:       {stream_Bps, streams, latency_s}                    stream_Bps null = unpaced
    accelerator: {memory_bytes}                                      null = no budget (the nominal GPU)
    engine:      {kind, max_num_seqs}

Each node becomes a `NodeSpec` whose tiers pace as the agent paces them, whose one "GPU" holds the node's memory
budget, and the cluster's object store (`ObjectStoreSpec`: per-stream bandwidth, streams, first-byte latency)
is the one the agents fetch through. An unpaced tier or store is planned at `UNPACED_BPS`: faster than any
device, so that a policy ranks it first, as the real copy is as fast as the machine allows.

Memory budget: the gateway's engine spec (`live_engine`) has `gpu_mem_util = 1` and `kv_reserve_frac = 0`, so an
instance takes exactly its model's resident weight bytes (`ModelSpec.resident_bytes`) from its node's budget and the
budget means what the user configured: the bytes of model weights the node's engines may hold at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import ConfigError
from core.specs import EngineSpec, GpuSpec, ModelSpec, NodeSpec, ObjectStoreSpec, TierSpec
from live.gateway_config import NOMINAL_TIER_BW_BPS

#: Bandwidth planned for an unpaced tier or store (bytes/s): 1 TB/s, faster than any real device.
UNPACED_BPS = 1e12
#: NIC bandwidth of a live node (loopback): the store's pacing, not the NIC, bounds a fetch.
LIVE_NIC_BPS = UNPACED_BPS
#: NIC bandwidth planned when the agents report no store pacing (the placeholder of earlier versions).
NOMINAL_NIC_BPS = 1e9


@dataclass(frozen=True)
class NodeReport:
    """What the gateway plans with for one node: its spec and its engine's batch limit and kind."""

    spec: NodeSpec
    max_num_seqs: int
    engine_kind: str = ""


def live_engine(engine: EngineSpec) -> EngineSpec:
    """`engine` with the memory accounting of a live node: an instance holds its weights' bytes of the budget."""
    return dataclasses.replace(engine, gpu_mem_util=1.0, kv_reserve_frac=0.0)


def _number(where: str, value: Any, *, positive: bool = True, integer: bool = False) -> float:
    """`value` as a float, or ValueError naming `where` (bool is not a number here)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or (value <= 0 if positive else value < 0):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{where} must be {kind} {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _rate(where: str, report: Mapping[str, Any], key: str) -> float:
    """A reported bandwidth: absent -> NOMINAL_TIER_BW_BPS (an agent that paces nothing and says nothing),
    null -> UNPACED_BPS, else a positive number."""
    if key not in report:
        return NOMINAL_TIER_BW_BPS
    value = report[key]
    return UNPACED_BPS if value is None else _number(f"{where}.{key}", value)


def tier_specs(node: str, status: Mapping[str, Any] | None) -> dict[str, TierSpec]:
    """The node's tiers as the agent reports them (capacity, pacing); nominal bandwidth where it reports none."""
    out: dict[str, TierSpec] = {}
    for name, t in ((status or {}).get("tiers") or {}).items():
        where = f"agent {node} /status tiers.{name}"
        cap = _number(f"{where}.capacity_bytes", t.get("capacity_bytes"))
        read, write = _rate(where, t, "read_Bps"), _rate(where, t, "write_Bps")
        lat = t.get("latency_s")
        latency = 0.0 if lat is None else _number(f"{where}.latency_s", lat, positive=False)
        out[name] = TierSpec(name, cap, read, write, latency_s=latency)
    return out


def store_spec(statuses: Sequence[Mapping[str, Any] | None]) -> ObjectStoreSpec | None:
    """The object store as the first agent reporting `cloud` sees it (all agents fetch from the same stores);
    None if none reports it."""
    for st in statuses:
        cloud = (st or {}).get("cloud")
        if not isinstance(cloud, Mapping):
            continue
        where = f"agent {st.get('node', '?')} /status cloud"  # type: ignore[union-attr]
        stream = cloud.get("stream_Bps")
        per_stream = UNPACED_BPS if stream is None else _number(f"{where}.stream_Bps", stream)
        streams = int(_number(f"{where}.streams", cloud.get("streams", 1), integer=True))
        ttfb = _number(f"{where}.latency_s", cloud.get("latency_s", 0.0) or 0.0, positive=False)
        return ObjectStoreSpec(name="live", per_stream_Bps=per_stream, streams=streams, ttfb_s=ttfb)
    return None


def node_report(node: str, status: Mapping[str, Any] | None, nominal_gpu: GpuSpec, default_max_num_seqs: int,
                price_per_hour: float, paced_store: bool) -> NodeReport:
    """One node's `NodeSpec` and engine batch limit from its agent's /status (None: the agent is down)."""
    st = status or {}
    gpu = nominal_gpu
    acc = st.get("accelerator")
    if isinstance(acc, Mapping) and acc.get("memory_bytes") is not None:
        budget = _number(f"agent {node} /status accelerator.memory_bytes", acc["memory_bytes"])
        gpu = dataclasses.replace(nominal_gpu, name=f"{node}-budget", mem_bytes=budget)
    max_num_seqs, kind = default_max_num_seqs, ""
    eng = st.get("engine")
    if isinstance(eng, Mapping):
        if eng.get("max_num_seqs") is not None:
            max_num_seqs = int(_number(f"agent {node} /status engine.max_num_seqs", eng["max_num_seqs"],
                                       integer=True))
        kind = str(eng.get("kind") or "")
    nic = LIVE_NIC_BPS if paced_store else NOMINAL_NIC_BPS
    cloud = st.get("cloud")
    if isinstance(cloud, Mapping) and cloud.get("nic_Bps") is not None:  # the agent paces its NIC: plan with it
        nic = _number(f"agent {node} /status cloud.nic_Bps", cloud["nic_Bps"])
    region = st.get("region")  # the agent's --region (core/regions.py); absent or "": NodeSpec's default
    where = {"region": region} if isinstance(region, str) and region else {}
    spec = NodeSpec(node, gpu, 1, nic, tier_specs(node, st), od_usd_per_hour=price_per_hour, **where)
    return NodeReport(spec, max_num_seqs, kind)


def check_budgets(reports: Mapping[str, NodeReport], models: Sequence[ModelSpec]) -> None:
    """ConfigError if a node's memory budget is smaller than every model (nothing could ever start there)."""
    if not models:
        return
    smallest = min(models, key=lambda m: m.resident_bytes)
    for name, r in reports.items():
        if r.spec.gpu.mem_bytes < smallest.resident_bytes:
            raise ConfigError(
                f"node {name!r}: memory budget {r.spec.gpu.mem_bytes:.0f} B (accelerator.memory_bytes) is smaller "
                f"than every model; the smallest, {smallest.name!r}, needs {smallest.resident_bytes:.0f} B")
