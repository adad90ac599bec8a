"""GPU memory waste, decomposed (docs/results/memory_waste.md). Pure: byte-second totals in, parts out.

Every instance's life is split into three states: *loading* (from its start until it is ready), *busy* (ready with
at least one request routed to it and not finished) and *idle* (ready with none: waiting for keep-alive to expire,
or stopping). Its reserved GPU memory-time R (the integral of the bytes it holds) splits into

- `useful`: weights while busy + live KV cache (KV is only live while busy);
- `kv_unused` (a): KV cache reserved (mapped) while busy but holding no live sequence;
- `idle` (b): everything an idle instance holds (weights and KV reservation);
- `loading`: everything an instance holds while it loads (weights arriving, KV not used yet).

The existing headline `core.metrics.memory_waste_frac` = 1 - (weights + live KV) / reserved is, in these terms,
(kv_unused + the KV share of idle + the KV share of loading) / reserved: it counts idle instances' weights as held,
not wasted. GPU memory no instance holds is split into `stranded` (c: holes no deployment of the catalog fits in)
and `unallocated` (d); `headroom` is what the engine never uses (1 - gpu_mem_util). Those three are reported
against the fleet's GPU capacity-time, not counted in the waste of reserved memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class InstanceTimes:
    """One instance's measured life: the bytes it holds when no KV page beyond its start is mapped (`base_bytes`:
    weights + static KV reservation, or weights + the elastic minimum), its weights, and its seconds per state."""

    base_bytes: float
    weights_bytes: float
    loading_s: float
    busy_s: float
    idle_s: float


def waste_parts(reserved_byte_s: float, weights_byte_s: float, kv_byte_s: float,
                instances: Iterable[InstanceTimes], *, capacity_byte_s: float = 0.0,
                headroom_byte_s: float = 0.0, stranded_byte_s: float = 0.0,
                unallocated_byte_s: float = 0.0) -> dict[str, Any]:
    """The parts of reserved GPU memory-time, each in byte-seconds, as a fraction of reserved and of capacity.

    `reserved_byte_s`, `weights_byte_s`, `kv_byte_s` are the run's totals (as `memory_waste_frac` takes them);
    `instances` the per-instance state times over the same window. Busy reservation is what is left of the total
    once loading and idle instances' holdings (`base_bytes` x seconds) are taken out: exact, since KV pages beyond
    the base are mapped only while sequences run.
    """
    load_b = load_w = idle_b = idle_w = busy_w = 0.0
    for it in instances:
        load_b += it.base_bytes * it.loading_s
        load_w += it.weights_bytes * it.loading_s
        idle_b += it.base_bytes * it.idle_s
        idle_w += it.weights_bytes * it.idle_s
        busy_w += it.weights_bytes * it.busy_s
    busy_b = reserved_byte_s - load_b - idle_b
    kv_unused = max(0.0, busy_b - busy_w - kv_byte_s)
    bytes_s = {
        "useful": busy_w + kv_byte_s,
        "kv_unused": kv_unused,
        "idle": idle_b,
        "idle_kv": max(0.0, idle_b - idle_w),
        "loading": load_b,
        "loading_kv": max(0.0, load_b - load_w),
    }
    waste_kv = kv_unused + bytes_s["idle_kv"] + bytes_s["loading_kv"]  # the headline's numerator
    waste_all = kv_unused + idle_b + bytes_s["loading_kv"]  # idle weights counted as waste too
    out: dict[str, Any] = {
        "byte_s": {**bytes_s, "reserved": reserved_byte_s, "weights": weights_byte_s, "live_kv": kv_byte_s,
                   "waste_kv": waste_kv, "waste_with_idle": waste_all},
        "frac_of_reserved": {k: _frac(v, reserved_byte_s) for k, v in
                             {**bytes_s, "waste_kv": waste_kv, "waste_with_idle": waste_all}.items()},
    }
    if capacity_byte_s > 0:
        cap = {"reserved": reserved_byte_s, "headroom": headroom_byte_s, "stranded": stranded_byte_s,
               "unallocated": unallocated_byte_s, "kv_unused": kv_unused, "idle": idle_b,
               "waste_with_idle": waste_all}
        out["byte_s"].update(capacity=capacity_byte_s, headroom=headroom_byte_s, stranded=stranded_byte_s,
                             unallocated=unallocated_byte_s)
        out["frac_of_capacity"] = {k: _frac(v, capacity_byte_s) for k, v in cap.items()}
    return out


def _frac(num: float, den: float) -> float | None:
    return num / den if den > 0 else None
