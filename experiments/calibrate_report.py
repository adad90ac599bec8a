"""Turn the calibration probes' samples into the simulator's config blocks (`cluster`, `engine`, `inference`,
`models`) and write them as `calibrated.yaml`, every number commented with its spread and its source.

The blocks are plain mappings that `core.spec_builders.cluster_from_dict`, `engine_from_dict`,
`core.inference.measured_from_dict` and `core.spec_builders.model_from_dict` read unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.specs import ModelSpec
from experiments.calibrate_probes import Stat, decode_intercept_s, prefill_rate, request_overheads_s
from experiments.serve_nodes import NodeOptions

ENGINE_NAME = "cpu"
GPU_NAME = "cpu-engine"  # the live node's "accelerator": a CPU engine within the node's memory budget
NO_KV_ALLOC_BPS = 1e15  # the CPU engine allocates no KV cache at start-up: a rate that makes the phase ~0


@dataclass(frozen=True)
class C:
    """A value with the comment written after it."""

    value: Any
    comment: str = ""


def _fmt_stat(s: Stat, unit: str = "", scale: float = 1.0) -> str:
    return f"{s.mean / scale:.4g} ± {s.sd / scale:.2g}{unit} (mean ± sd, n={s.n})"


def _mbps(s: Stat) -> str:
    return _fmt_stat(s, " MB/s", 1e6)


def _secs(s: Stat) -> str:
    return _fmt_stat(s, " s")


def _num(x: Any) -> str:
    """YAML 1.1 scalars PyYAML and OmegaConf both read as numbers (a float needs its dot and signed exponent)."""
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return ".inf" if math.isinf(x) else f"{x:.6e}"
    return str(x) if isinstance(x, str) and x.replace("-", "").replace("_", "").replace(".", "").isalnum() \
        else '"' + str(x).replace('"', '\\"') + '"'


def _plain(v: Any) -> Any:
    if isinstance(v, C):
        return _plain(v.value)
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def to_yaml(data: Mapping[str, Any], indent: int = 0) -> list[str]:
    """Block YAML of nested mappings / lists whose leaves may be `C` (value + comment); lists of scalars are
    written in flow style."""
    pad = " " * indent
    lines: list[str] = []
    for key, v in data.items():
        comment = f"  # {v.comment}" if isinstance(v, C) and v.comment else ""
        value = v.value if isinstance(v, C) else v
        if isinstance(value, Mapping):
            lines.append(f"{pad}{key}:{comment}")
            lines += to_yaml(value, indent + 2)
        elif isinstance(value, list | tuple) and value and isinstance(_unwrap(value[0]), Mapping):
            lines.append(f"{pad}{key}:{comment}")
            for item in value:
                sub = to_yaml(_unwrap(item), indent + 4)
                lines.append(f"{pad}  - {sub[0].lstrip()}")
                lines += sub[1:]
        elif isinstance(value, list | tuple):
            lines.append(f"{pad}{key}: [{', '.join(_num(_unwrap(x)) for x in value)}]{comment}")
        else:
            lines.append(f"{pad}{key}: {_num(value)}{comment}")
    return lines


def _unwrap(v: Any) -> Any:
    return v.value if isinstance(v, C) else v


# --------------------------------------------------------------------------- blocks


def tier_stats(samples: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, Stat]]:
    """Per tier: write_Bps and read_Bps Stats over every probe sample (every repeat, every checkpoint)."""
    out: dict[str, dict[str, list[float]]] = {}
    for sample in samples:
        for tier, row in sample.items():
            slot = out.setdefault(tier, {"write_Bps": [], "read_Bps": []})
            for k in ("write_Bps", "read_Bps"):
                if k in row:
                    slot[k].append(row[k])
    return {t: {k: Stat.of(v) for k, v in d.items()} for t, d in out.items()}


def cluster_block(node: NodeOptions, nodes: int, tiers: Mapping[str, Mapping[str, Stat]], dram_read: Stat,
                  h2d: Stat, stream: Stat, ttfb: Stat, aggregate: Stat, streams: int, memory_bytes: float,
                  gpu_flops: float, gpu_hbm_Bps: float, kv_reserve_frac: float) -> dict[str, Any]:
    """The `cluster` block: one node group of `nodes` nodes with one "GPU": the memory budget (weights) plus
    the KV cache the simulator reserves beside them (`kv_reserve_frac`; live it lies outside the budget)."""
    tier_block: dict[str, Any] = {}
    for name, opts in node.tiers.items():
        st = tiers[name]
        read = st["read_Bps"] if st["read_Bps"].n else dram_read
        read_src = "copy out of it into the fastest-write tier" if st["read_Bps"].n else \
            "the CPU engine's read of host memory (bytes / read_s; engines read dram unpaced)"
        tier_block[name] = {
            "capacity_bytes": C(float(opts.capacity_bytes), f"as configured (tiers.{name}.capacity), not measured"),
            "read_bw_Bps": C(read.mean, f"{_mbps(read)}: {read_src}"),
            "write_bw_Bps": C(st["write_Bps"].mean, f"{_mbps(st['write_Bps'])}: copy host memory -> {name}"),
            "latency_s": C(opts.latency_s, "as configured: below the timer noise of one copy, not separable"),
        }
    group = {
        "name": "calibrated",
        "count": C(nodes, "nodes, as configured"),
        "n_gpus": 1,
        "nic_Bps": C(aggregate.mean, f"{_mbps(aggregate)}: the measured {streams}-stream fetch rate (the agent's "
                                     "NIC is unpaced; this is what a fetch reached)"),
        "gpu": {
            "name": GPU_NAME,
            "mem_bytes": C(memory_bytes * (1.0 + kv_reserve_frac),
                           f"node.memory_budget ({memory_bytes:.0f} bytes of weights, as configured) x (1 + engine."
                           "kv_reserve_frac): live, KV caches lie outside the budget"),
            "hbm_Bps": C(gpu_hbm_Bps, "roofline stand-in: weights / measured decode step at batch 1 (the measured "
                                      "table overrides the roofline for the probed models)"),
            "flops": C(gpu_flops, "roofline stand-in: 2 x params x measured prefill tokens/s"),
            "h2d_Bps": C(h2d.mean, f"{_mbps(h2d)}: checkpoint bytes / the engine's load_s from host memory "
                                   "(read + bf16 -> float32: the live stand-in for the host -> GPU copy)"),
        },
        "tiers": tier_block,
    }
    store = {
        "name": "calibrated",
        "per_stream_Bps": C(stream.mean, f"{_mbps(stream)}: from fetches with 1 and with {streams} streams"),
        "streams": C(streams, "as configured (cloud.streams)"),
        "ttfb_s": C(ttfb.mean, f"{_secs(ttfb)}: intercept of the same two fetches"),
        "price_usd_per_gb_month": 0.0,
    }
    return {"failover_s": 0.0, "store": store, "node_groups": [group]}


def step_overhead(steps_by_model: Mapping[str, Mapping[str, Any]]) -> C:
    """`engine.step_overhead_s`: the fixed time of one forward pass, as the intercept of decode step time vs batch
    size (the prefill intercept over prompt length where only one batch size was probed or the decode
    step did not grow with batch size: noise).

    Clamped per model to [0, 0.9 x its fastest decode step] so the measured table, which the simulator then
    holds net of it, stays positive; the engine block takes the smallest over the models (one engine).
    """
    parts, values = [], []
    for model, steps in steps_by_model.items():
        decode = {int(k): [float(t) for t in v] for k, v in steps["decode"].items()}
        cap = 0.9 * min(Stat.of(v).mean for v in decode.values())
        b, se = decode_intercept_s(decode)
        how = f"decode intercept {b:.3g} ± {se:.2g} s (± standard error)"
        if not math.isfinite(b):
            _, b = prefill_rate({int(k): list(v) for k, v in steps["prefill"].items()})
            how = f"prefill intercept {b:.3g} s (decode: one batch size, or no growth with batch)"
        values.append(min(max(b, 0.0), cap))
        parts.append(f"{model}: {how}, clamped to [0, {cap:.3g}]")
    value = min(values) if values else 0.0
    return C(value, "per forward pass (every prefill and decode step), the smallest of: " + "; ".join(parts)
             + "; the inference.measured decode_iter_s are net of it")


def request_overhead(steps_by_model: Mapping[str, Mapping[str, Any]]) -> C:
    """`engine.request_overhead_s`: client-side TTFT of a warm max_tokens=1 request over HTTP straight to the engine
    (no gateway in the probe) minus the engine's own arrival -> first token (/stats last_request.first_token_s)."""
    st = Stat.of([x for steps in steps_by_model.values() for x in request_overheads_s(dict(steps))])
    value = st.mean if st.n else 0.0
    return C(value, f"{_secs(st)}: warm client TTFT (HTTP, direct to the engine) - engine first_token_s, "
                    "every prefill probe of every model")


def engine_block(process: Stat, after_weights: Stat, first_forward: Stat, max_num_seqs: int,
                 kv_reserve_frac: float, step_overhead_s: C | None = None,
                 request_overhead_s: C | None = None, stop: Stat | None = None) -> dict[str, Any]:
    """The `engine` block; which live phase fed which EngineSpec field is in each comment.

    The overheads are written only when given (`step_overhead`, `request_overhead`), the stop only when measured
    (`stop`: POST /unload durations); absent, the spec's 0 applies.
    """
    capture = Stat.of([a + f for a, f in zip(after_weights.samples, first_forward.samples, strict=False)])
    overheads = {k: v for k, v in (("step_overhead_s", step_overhead_s), ("request_overhead_s", request_overhead_s))
                 if v is not None}
    return {
        "name": ENGINE_NAME,
        "process_start_s": C(process.mean, f"{_secs(process)}: spawn -> interpreter + torch imports done "
                                           "(/stats imports_done_at_s)"),
        "kv_alloc_Bps": C(NO_KV_ALLOC_BPS, "not a rate: the CPU engine allocates KV per sequence on admission, "
                                           "none at start-up (its ready - resident time is in graph_capture_s)"),
        "graph_capture_s": C(capture.mean, f"{_secs(capture)}: weights resident -> ready (ready_at_s - "
                                           f"weights_resident_at_s: {_secs(after_weights)}) + the first forward's "
                                           f"excess over a warm one ({_secs(first_forward)})"),
        "compile_s": C(0.0, "the CPU engine compiles nothing"),
        "gpu_mem_util": C(1.0, "the node's memory budget is what engines may hold"),
        "kv_reserve_frac": C(kv_reserve_frac, "KV of max_num_seqs full-context sequences / resident weights, the "
                                              "largest over the probed checkpoints (from their config.json)"),
        "max_num_seqs": C(max_num_seqs, "node.max_num_seqs (the engine's batch limit), as configured"),
        "prefill_mfu": C(1.0, "the gpu block's flops are the measured prefill rate already"),
        "weight_read_eff": C(1.0, "the gpu block's hbm_Bps is the measured decode rate already"),
        "kv_read_eff": C(1.0, "the gpu block's hbm_Bps is the measured decode rate already"),
        "overlap_start_with_fetch": C(False, "live, the agent fetches / copies before it starts the engine"),
        "prefill_stalls_decode": C(True, "the CPU engine runs a newcomer's prefill chunk in the same forward pass as "
                                         "the running sequences' decode tokens (live/engines/batching.py _step)"),
        **overheads,
        **(stop_fields(stop) if stop is not None and stop.n else {}),
    }


def stop_fields(stop: Stat) -> dict[str, C]:
    """`stop_s` (the measured engine stop) and `demote_before_stop` (how the live gateway orders a demoting stop)."""
    return {
        "stop_s": C(stop.mean, f"{_secs(stop)}: POST /unload round trip (SIGTERM -> the engine's process group "
                               "reaped); the gateway frees the memory only then"),
        "demote_before_stop": C(True, "live.gateway_actions._run_stop copies a demoted engine's weights, then "
                                      "unloads it: the memory stays held for the copy"),
    }


def measured_block(model: str, steps: Mapping[str, Any],
                   step_overhead_s: float = 0.0) -> tuple[dict[str, Any], float, float]:
    """One `inference.measured` entry for `model`, its prefill tokens/s and decode step at batch 1.

    The decode steps are written net of `step_overhead_s` (the simulator adds it back to every step, so the
    sum is the measured step time); the returned batch-1 step is net of it too.
    """
    prefill = {int(k): list(v) for k, v in steps["prefill"].items()}
    rate, fixed_s = prefill_rate(prefill)
    per_len = "; ".join(f"L={n}: {_secs(Stat.of(ts))}" for n, ts in sorted(prefill.items()))
    decode = {int(k): Stat.of(v) for k, v in steps["decode"].items()}
    batches = sorted(decode)
    entry = {
        "engine": ENGINE_NAME, "model": model, "gpu": GPU_NAME,
        "prefill_tokens_per_s": C(rate, f"slope of time-to-first-token over prompt length (fixed {fixed_s:.3g} s "
                                        f"per request dropped; the table has no prompt-length or batch axis for "
                                        f"prefill): {per_len}"),
        "decode_batch": C(batches, "batch sizes probed"),
        "decode_iter_s": C([decode[b].mean - step_overhead_s for b in batches],
                           "; ".join(f"B={b}: {_secs(decode[b])}" for b in batches)
                           + (f"; each minus engine.step_overhead_s {step_overhead_s:.3g} s" if step_overhead_s
                              else "")),
    }
    return entry, rate, decode[batches[0]].mean - step_overhead_s


def model_entry(spec: ModelSpec) -> dict[str, Any]:
    """A `models.extra` entry: the catalog checkpoint's spec (from its config.json; not a measurement)."""
    return {"name": spec.name, "params_b": spec.params_b, "n_layers": spec.n_layers, "hidden_size": spec.hidden_size,
            "n_kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim, "dtype_bytes": spec.dtype_bytes,
            "resident_dtype_bytes": spec.resident_dtype_bytes or spec.dtype_bytes}


def document(header: Sequence[str], blocks: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The yaml text (header comments, then the blocks) and the same blocks as plain data."""
    text = "\n".join([*(f"# {h}" for h in header), *to_yaml(blocks)]) + "\n"
    return text, _plain(blocks)
